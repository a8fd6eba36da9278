pub mod raw;
pub mod spec;
pub mod wire;
