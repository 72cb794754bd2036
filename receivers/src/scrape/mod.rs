//! What every pull receiver shares: the text-format parser and the conversion to OTLP.

pub mod text;
pub mod convert;
