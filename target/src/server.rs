//! Listening sockets and the policy seam ([`Portal`]).
