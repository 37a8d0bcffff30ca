//! Finding a lab and dialing it: the lab directory comes from `--lab DIR` or `FAILBACK_LAB`;
//! `DIR/lab.json` says where the CS and the vpn-link control API listen; `DIR/operator`
//! holds the operator credentials `lab up` had the CS issue. Errors say what to do.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use failback_common::identity::{CS_NAME, Role};
use failback_common::tls::{Credentials, describe_error};
use failback_proto::pb::link::link_control_client::LinkControlClient;
use failback_proto::pb::operator::operator_client::OperatorClient;
use tonic::transport::Channel;

use crate::labfile::LabState;

/// Environment variable naming the lab directory when `--lab` is not given.
pub const LAB_ENV: &str = "FAILBACK_LAB";

/// The name `lab up` issues the operator's credentials under.
pub const OPERATOR_NAME: &str = "srctl";

/// The lab directory from `--lab` or the environment.
pub fn lab_dir(flag: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    flag.or_else(|| std::env::var_os(LAB_ENV).map(PathBuf::from))
        .ok_or_else(|| anyhow!("no lab given: pass --lab DIR or set {LAB_ENV}=DIR (start one with `srctl lab up --dir DIR`)"))
}

/// The operator credentials of the lab in `dir` (`DIR/operator/identity/`), issued on the
/// CS host by `config-server operator add` (what `lab up` and `deploy/lab up` run).
pub fn operator_credentials(dir: &Path) -> anyhow::Result<Credentials> {
    let data = dir.join("operator");
    Credentials::load_role(&data, Role::Operator)?.ok_or_else(|| {
        anyhow!(
            "no operator credentials in {}: was this lab started with `srctl lab up --dir {}`? \
             (on the configuration server's host, `config-server operator add NAME --out {}` \
             issues them)",
            data.display(),
            dir.display(),
            data.display()
        )
    })
}

/// An operator client to the lab's CS, or an error saying the lab is not running.
pub async fn operator(dir: &Path) -> anyhow::Result<OperatorClient<Channel>> {
    let state = LabState::load(dir)?;
    let creds = operator_credentials(dir)?;
    let channel = creds
        .endpoint(&state.cs_api, Role::ConfigServer, CS_NAME)?
        .connect()
        .await
        .map_err(|e| {
            anyhow!(
                "the configuration server of the lab in {} is not answering at {}: {}; is the lab \
                 running? (`srctl lab status --lab {}`, `srctl lab up --dir {}`)",
                dir.display(),
                state.cs_api,
                describe_error(&e),
                dir.display(),
                dir.display()
            )
        })?;
    Ok(OperatorClient::new(channel))
}

/// A client of the lab's vpn-link control API (mutual TLS, the operator's certificate).
pub async fn link(dir: &Path) -> anyhow::Result<LinkControlClient<Channel>> {
    let state = LabState::load(dir)?;
    let creds = operator_credentials(dir)?;
    let endpoint = creds
        .endpoint(&state.link_control, Role::VpnLink, &state.link_name)
        .context("bad vpn-link control address")?;
    let channel = endpoint.connect().await.map_err(|e| {
        anyhow!(
            "vpn-link of the lab in {} is not answering at {}: {}; is the lab running? \
             (`srctl lab status --lab {}`)",
            dir.display(),
            state.link_control,
            describe_error(&e),
            dir.display()
        )
    })?;
    Ok(LinkControlClient::new(channel))
}

/// A gRPC status as one line an operator can act on.
pub fn status_message(s: &tonic::Status) -> String {
    if s.message().is_empty() {
        format!("{}", s.code())
    } else {
        s.message().to_string()
    }
}
