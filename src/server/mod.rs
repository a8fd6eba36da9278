//! The network side: listeners, connections, sessions.
