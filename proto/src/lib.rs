//! The gRPC protocol of Failback Lab.
//!
//! # Layout
//! - [`pb`]: code generated from `proto/*.proto` by protox + tonic-prost-build at build time
//!   (no system `protoc`).
//! - [`ProtocolError`]: what a receiver reports when a message lacks a field or carries a
//!   value out of range; it converts into `Status::invalid_argument`. Validation happens
//!   once, where a message is received.

/// Generated protobuf and gRPC code, one module per proto package.
#[allow(clippy::large_enum_variant, clippy::derive_partial_eq_without_eq)]
pub mod pb {
    pub mod enroll {
        tonic::include_proto!("failback.enroll.v1");
    }
    pub mod control {
        tonic::include_proto!("failback.control.v1");
    }
    pub mod operator {
        tonic::include_proto!("failback.operator.v1");
    }
    pub mod data {
        tonic::include_proto!("failback.data.v1");
    }
    pub mod link {
        tonic::include_proto!("failback.link.v1");
    }
}

/// Every proto of the lab as a serialized `FileDescriptorSet` (what `grpcurl -protoset` and
/// protobuf's descriptor pools read).
pub const PROTOSET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/failback.protoset"));

/// A received message that does not satisfy the protocol.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("missing field `{0}`")]
    Missing(&'static str),
    #[error("invalid field `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl From<ProtocolError> for tonic::Status {
    fn from(e: ProtocolError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}
