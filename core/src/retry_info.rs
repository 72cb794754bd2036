//! gRPC's retry hint: a `google.rpc.Status` carrying a `google.rpc.RetryInfo` in the
//! `grpc-status-details-bin` trailer, which OTLP servers send with `RESOURCE_EXHAUSTED` or
//! `UNAVAILABLE` to say when to come back. The three messages are small enough to declare here
//! rather than pull in a crate of Google's types.

use std::time::Duration;

use prost::Message as _;

const RETRY_INFO_URL: &str = "type.googleapis.com/google.rpc.RetryInfo";

#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<Any>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Any {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RetryInfo {
    #[prost(message, optional, tag = "1")]
    retry_delay: Option<ProtoDuration>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ProtoDuration {
    #[prost(int64, tag = "1")]
    seconds: i64,
    #[prost(int32, tag = "2")]
    nanos: i32,
}

/// The status details for a gRPC error with code `code` asking the client to wait `delay`.
pub fn encode(code: i32, message: &str, delay: Duration) -> Vec<u8> {
    let info = RetryInfo {
        retry_delay: Some(ProtoDuration {
            seconds: delay.as_secs() as i64,
            nanos: delay.subsec_nanos() as i32,
        }),
    };
    RpcStatus {
        code,
        message: message.to_owned(),
        details: vec![Any {
            type_url: RETRY_INFO_URL.to_owned(),
            value: info.encode_to_vec(),
        }],
    }
    .encode_to_vec()
}

/// The delay a gRPC error's status details ask for, if they carry a `RetryInfo`.
pub fn decode(details: &[u8]) -> Option<Duration> {
    let status = RpcStatus::decode(details).ok()?;
    let any = status
        .details
        .iter()
        .find(|a| a.type_url == RETRY_INFO_URL)?;
    let d = RetryInfo::decode(&any.value[..]).ok()?.retry_delay?;
    (d.seconds >= 0 && d.nanos >= 0).then(|| Duration::new(d.seconds as u64, d.nanos as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_garbage() {
        let d = Duration::from_millis(1500);
        assert_eq!(decode(&encode(8, "busy", d)), Some(d));
        assert_eq!(decode(b""), None);
        assert_eq!(decode(b"\xff\x00garbage"), None);
        let no_info = RpcStatus {
            code: 8,
            message: "x".into(),
            details: vec![],
        };
        assert_eq!(decode(&no_info.encode_to_vec()), None);
    }
}
