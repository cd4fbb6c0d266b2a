//! Random bytes as guest code (filled in below).
