//! `strata serve` as a long-running service: socket activation ([`activation`]),
//! readiness notifications ([`notify`]), a pid file ([`pid_file`]) and reloading the
//! configured exports ([`reload`]).

pub mod activation;
pub mod notify;
pub mod pid_file;
pub mod reload;
