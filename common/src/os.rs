//! The operating system of a machine or a master target: a Linux machine fails back through a
//! Linux master target, a Windows machine through a Windows one (ASR).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Os {
    #[default]
    Windows,
    Linux,
}

impl Os {
    pub fn as_str(self) -> &'static str {
        match self {
            Os::Windows => "windows",
            Os::Linux => "linux",
        }
    }

    /// ASR's name for it in messages.
    pub fn title(self) -> &'static str {
        match self {
            Os::Windows => "Windows",
            Os::Linux => "Linux",
        }
    }

    pub fn to_pb(self) -> failback_proto::pb::control::Os {
        match self {
            Os::Windows => failback_proto::pb::control::Os::Windows,
            Os::Linux => failback_proto::pb::control::Os::Linux,
        }
    }

    /// The OS a peer reported (`None`: it did not say).
    pub fn from_pb(os: failback_proto::pb::control::Os) -> Option<Os> {
        match os {
            failback_proto::pb::control::Os::Windows => Some(Os::Windows),
            failback_proto::pb::control::Os::Linux => Some(Os::Linux),
            failback_proto::pb::control::Os::Unspecified => None,
        }
    }

    /// Parses what `as_str` wrote (a stored label); `None` for anything else.
    pub fn parse(s: &str) -> Option<Os> {
        match s {
            "windows" => Some(Os::Windows),
            "linux" => Some(Os::Linux),
            _ => None,
        }
    }
}
