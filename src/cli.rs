//! The command line: clap definitions and dispatch.
