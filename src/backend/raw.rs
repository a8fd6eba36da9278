//! Raw file (placeholder).
/// Placeholder.
pub struct RawBackend;
impl RawBackend { /// Placeholder.
pub fn open(_p: &str, _ro: bool) -> crate::Result<Self> { todo!() } #[allow(dead_code)] fn x(_size: u64) -> Self { todo!() } }
impl super::Backend for RawBackend {
    fn size(&self) -> u64 { 0 }
    fn capabilities(&self) -> super::Capabilities { super::Capabilities::NONE }
    async fn read(&self, _o: u64, _l: usize) -> crate::Result<bytes::Bytes> { todo!() }
    async fn write(&self, _o: u64, _d: bytes::Bytes, _f: bool) -> crate::Result<()> { todo!() }
}
