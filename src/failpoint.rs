//! Named points where a test can stop the process, to check what a restart finds after
//! a crash at that exact step (a snapshot half taken, a suspend half saved).
//!
//! Compiled only with the `failpoints` cargo feature, which the project's own tests turn
//! on (Cargo.toml lists the crate as its own dev-dependency with it): a release build
//! cannot be made to abort by its environment.

/// Stops the process at `step` when the environment variable `STRATA_FAILPOINT` names
/// it. Without the `failpoints` feature this does nothing.
#[inline]
pub fn hit(step: &str) {
    #[cfg(feature = "failpoints")]
    {
        static CHOSEN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        let chosen = CHOSEN.get_or_init(|| std::env::var("STRATA_FAILPOINT").ok());
        if chosen.as_deref() == Some(step) {
            eprintln!("strata: stopping at failpoint {step}");
            std::process::abort();
        }
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = step;
}
