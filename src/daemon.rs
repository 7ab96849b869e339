//! Daemon: starts the writer, the relay worker and the SMTP listener, and
//! stops them in order on SIGTERM.
