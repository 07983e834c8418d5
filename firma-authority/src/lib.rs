//! Placeholder

pub mod collector;
