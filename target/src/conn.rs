//! One iSCSI connection: login, then full feature phase.
