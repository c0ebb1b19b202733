//! How requests arrive. Thin: parse, authenticate, call into the domain, answer.

pub mod admin;
pub mod operations;
pub mod public;
pub mod spice;
pub mod vnc;
