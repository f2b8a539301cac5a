//! A file-backed [`crate::scsi::BlockDevice`] (sparse file, positional I/O).
