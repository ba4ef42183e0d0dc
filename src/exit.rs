//! Process exit codes.
//!
//! The values follow BSD `sysexits.h`, which systemd and shell scripts
//! already understand. The unit file relies on [`CONFIG`] in
//! `RestartPreventExitStatus=`: a broken configuration must not make systemd
//! restart the daemon in a loop.

/// Success.
pub const OK: u8 = 0;
/// Stored data is in a format this build does not read, e.g. another schema version (`EX_DATAERR`).
/// Restarting cannot help, so the unit does not restart on it either.
pub const DATA_ERR: u8 = 65;
/// A file a command was asked to read does not exist or cannot be read (`EX_NOINPUT`).
pub const NO_INPUT: u8 = 66;
/// An internal error: a bug, or a failure the daemon has no better code for (`EX_SOFTWARE`).
pub const SOFTWARE: u8 = 70;
/// A directory or file could not be created, or is not writable (`EX_CANTCREAT`).
pub const CANT_CREATE: u8 = 73;
/// An I/O error on the store, including a failed flush or fsync (`EX_IOERR`).
pub const IO_ERROR: u8 = 74;
/// A temporary failure worth retrying later, e.g. the store is locked by another process (`EX_TEMPFAIL`).
pub const TEMP_FAIL: u8 = 75;
/// The configuration is invalid (`EX_CONFIG`). systemd must not restart on it.
pub const CONFIG: u8 = 78;
/// An operator command the daemon refused: no such job, or not now.
pub const REFUSED: u8 = 1;
/// The command line was wrong, or a confirmation was missing (`EX_USAGE`).
pub const USAGE: u8 = 64;
/// The daemon could not be reached or could not answer (`EX_UNAVAILABLE`).
pub const UNAVAILABLE: u8 = 69;
/// Not allowed to talk to the daemon: not root, not in its group (`EX_NOPERM`).
pub const NO_PERMISSION: u8 = 77;
