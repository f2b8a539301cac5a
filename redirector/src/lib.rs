//! `ironblock-redirector`: holds the virtual IP and redirects iSCSI logins.
//!
//! Answers discovery with the VIP portal and every normal-session login with
//! a login redirect to a live chunk chosen by rendezvous hashing. It never
//! carries data and keeps no state of its own beyond the VIP lease.
//!
//! Status: not built yet (see the redirector issue).
