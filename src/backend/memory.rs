//! In-memory sparse disk (placeholder).
/// Placeholder.
pub struct MemoryBackend;
impl MemoryBackend { /// Placeholder.
pub fn new(_size: u64) -> Self { todo!() } }
impl super::Backend for MemoryBackend {
    fn size(&self) -> u64 { 0 }
    fn capabilities(&self) -> super::Capabilities { super::Capabilities::NONE }
    async fn read(&self, _o: u64, _l: usize) -> crate::Result<bytes::Bytes> { todo!() }
    async fn write(&self, _o: u64, _d: bytes::Bytes, _f: bool) -> crate::Result<()> { todo!() }
}
