//! `lab render --to stack`: a topology as Docker Swarm stack files, for running each site on
//! a machine of its own (`docker stack deploy`). What differs from the compose file
//! (`lab render --to compose`), as Swarm needs:
//!
//! - Placement by node label: on-premises services run on nodes labelled `site=onprem`, Azure's
//!   on `site=azure` (`FBL_SWARM_ONPREM_PLACEMENT` and `FBL_SWARM_AZURE_PLACEMENT` replace the
//!   constraints, e.g. with `node.id == ...` to put both sites on one node, as `deploy/swarm-test`
//!   does without touching an existing swarm's labels). A site's datastore volumes are local to
//!   its node: one node per site (or a volume driver shared by the site's nodes).
//! - Overlay networks `onprem` and `azure`, joined only by vpn-link; services resolve by DNS
//!   round robin (`endpoint_mode: dnsrr`): this engine's kernel has no IPVS, so no virtual IPs
//!   and no ingress mesh. Published ports are host-mode.
//! - Swarm ignores `depends_on` and `container_name`: components retry the CS by themselves,
//!   and the restart policy starts again one that gave up. Trust comes as a Swarm config
//!   (`fbl-ca`, the CA certificate) and secret (`fbl-passphrase`) published from the CS
//!   after `stack-cs.yaml` (the CS alone) is up, then `stack.yaml` (everything) is deployed:
//!   `deploy/swarm` does both.
//! - Component configs are Swarm configs made from `config/NAME.toml` (the same files as for
//!   compose), so no node needs the files.

use std::fmt::Write as _;

use failback_common::identity::Site;

pub use crate::containers::Component;
use crate::containers::{CS_API_PORT, CS_ENROLL_PORT, LAB_UID, LINK_CONTROL_PORT};
use crate::topology::Topology;

fn constraint(site: Site) -> String {
    match site {
        Site::Onprem => "${FBL_SWARM_ONPREM_PLACEMENT:-node.labels.site == onprem}".into(),
        Site::Azure => "${FBL_SWARM_AZURE_PLACEMENT:-node.labels.site == azure}".into(),
    }
}

fn deploy(site: Site, restart: &str, replicas: u32) -> String {
    format!(
        "    deploy:\n      replicas: {replicas}\n      endpoint_mode: dnsrr\n      placement:\n        constraints: [\"{}\"]\n      \
         restart_policy:\n        condition: {restart}\n        delay: 2s\n",
        constraint(site)
    )
}

fn trust() -> String {
    format!(
        "      - source: fbl-ca\n        target: /trust/ca.pem\n        uid: \"{LAB_UID}\"\n        gid: \"{LAB_UID}\"\n        mode: 0444\n"
    )
}

fn secret() -> String {
    format!(
        "    secrets:\n      - source: fbl-passphrase\n        target: /trust/passphrase\n        uid: \"{LAB_UID}\"\n        gid: \"{LAB_UID}\"\n        mode: 0400\n"
    )
}

fn health(port: &str) -> String {
    format!(
        "    healthcheck:\n      <<: *health\n      test: [\"CMD\", \"fbl-helper\", \"probe-tls\", {port}]\n"
    )
}

/// The stack file: everything, or (`cs_only`) the configuration server alone.
pub fn stack(t: &Topology, cs_name: &str, components: &[Component], cs_only: bool) -> String {
    let mut y = String::new();
    let _ = write!(
        y,
        "# Failback Lab on Docker Swarm: topology `{name}` (rendered by `srctl lab render --to stack`).\n\
         # {what}\n\
         #\n\
         # Deploy with deploy/swarm (it does these steps): label the nodes (`docker node update\n\
         # --label-add site=onprem NODE`, and site=azure), get the image onto every node, deploy\n\
         # stack-cs.yaml, publish the CS's ca.pem as config `fbl-ca` and its passphrase as secret\n\
         # `fbl-passphrase`, deploy stack.yaml under the same stack name.\n\
         #\n\
         # One node per site: a site's datastore volumes are local to its node. Services resolve by\n\
         # DNS round robin (no IPVS here: no virtual IPs, no ingress mesh), ports are host-mode,\n\
         # and components wait for the CS by themselves (Swarm ignores depends_on).\n\n\
         version: \"3.8\"\n\n",
        name = t.name,
        what = if cs_only {
            "This file: the configuration server alone, deployed first so that the CA exists."
        } else {
            "This file: every component (deploy it after stack-cs.yaml and the trust publication)."
        }
    );
    y.push_str(
        "x-component: &component\n  image: ${FBL_IMAGE:-failback-lab:latest}\n  environment:\n    RUST_LOG: ${RUST_LOG:-info}\n  stop_grace_period: 10s\n\n\
         x-health: &health\n  interval: 2s\n  timeout: 3s\n  retries: 90\n  start_period: 10s\n\n\
         services:\n",
    );
    let _ = write!(
        y,
        "  {cs_name}:\n    <<: *component\n    hostname: cs\n    \
         command: [\"config-server\", \"run\", \"--config\", \"/config/{cs_name}.toml\"]\n    \
         volumes:\n      - {cs_name}-data:/data\n    \
         configs:\n      - source: {cs_name}-config\n        target: /config/{cs_name}.toml\n    \
         networks:\n      onprem:\n        aliases: [cs]\n    ports:\n      # The host's srctl: enrollment of the operator, then the operator API.\n      \
         - target: {CS_ENROLL_PORT}\n        published: ${{FBL_CS_ENROLL_PORT:-17001}}\n        mode: host\n      \
         - target: {CS_API_PORT}\n        published: ${{FBL_CS_API_PORT:-17002}}\n        mode: host\n{}{}\n",
        deploy(Site::Onprem, "any", 1),
        health(&format!(
            "\"127.0.0.1:{CS_ENROLL_PORT}\", \"127.0.0.1:{CS_API_PORT}\""
        )),
    );
    if !cs_only {
        for site in [Site::Onprem, Site::Azure] {
            let mut ds: Vec<&String> = components
                .iter()
                .filter(|c| c.site == site)
                .flat_map(|c| c.datastores.iter())
                .collect();
            ds.sort();
            ds.dedup();
            if ds.is_empty() {
                continue;
            }
            let _ = write!(
                y,
                "  # One-shot, on the {s} node: hands the site's datastore volumes to the lab's user\n  \
                 # (Docker makes a new volume's root root's unless the image has the mount point).\n  \
                 datastores-{s}:\n    <<: *component\n    user: \"0:0\"\n    \
                 command: [\"fbl-helper\", \"own\", \"{LAB_UID}\"{paths}]\n    volumes:\n{mounts}\
                 {deploy}\n",
                s = site.as_str(),
                paths = ds
                    .iter()
                    .map(|d| format!(", \"/datastores/{d}\""))
                    .collect::<String>(),
                mounts = ds
                    .iter()
                    .map(|d| format!("      - {d}:/datastores/{d}\n"))
                    .collect::<String>(),
                deploy = deploy(site, "on-failure", 1),
            );
        }
        let _ = write!(
            y,
            "  vpn:\n    <<: *component\n    hostname: vpn\n    \
             command: [\"vpn-link\", \"--config\", \"/config/vpn.toml\"]\n    \
             volumes:\n      - vpn-data:/data\n    \
             configs:\n      - source: vpn-config\n        target: /config/vpn.toml\n{}{}    \
             networks:\n      onprem:\n        aliases: [vpn]\n      azure:\n        aliases: [vpn]\n    \
             ports:\n      - target: {LINK_CONTROL_PORT}\n        published: ${{FBL_LINK_CONTROL_PORT:-17000}}\n        mode: host\n{}{}\n",
            trust(),
            secret(),
            deploy(Site::Onprem, "any", 1),
            health(&format!("\"127.0.0.1:{LINK_CONTROL_PORT}\"")),
        );
        for c in components {
            let mut volumes = format!("      - {}-data:/data\n", c.name);
            for ds in &c.datastores {
                let _ = writeln!(volumes, "      - {ds}:/datastores/{ds}");
            }
            let _ = write!(
                y,
                "  {n}:\n    <<: *component\n    hostname: {n}\n    \
                 command: [\"{b}\", \"--config\", \"/config/{n}.toml\"]\n    volumes:\n{volumes}    \
                 configs:\n      - source: {n}-config\n        target: /config/{n}.toml\n{trust}{secret}    \
                 networks:\n      {site}:\n        aliases: [{n}]\n{deploy}{health}\n",
                n = c.name,
                b = c.binary,
                site = c.site.as_str(),
                trust = trust(),
                secret = secret(),
                deploy = deploy(c.site, "any", if c.later { 0 } else { 1 }),
                health = health(&format!("\"127.0.0.1:{}\"", c.port)),
            );
        }
    }
    y.push_str(
        "networks:\n  onprem:\n    driver: overlay\n    attachable: true\n    ipam:\n      config:\n        - subnet: ${FBL_NET_PREFIX:-10.214}.1.0/24\n",
    );
    if !cs_only {
        y.push_str(
            "  azure:\n    driver: overlay\n    attachable: true\n    ipam:\n      config:\n        - subnet: ${FBL_NET_PREFIX:-10.214}.2.0/24\n",
        );
    }
    let _ = write!(y, "\nvolumes:\n  {cs_name}-data:\n");
    if !cs_only {
        y.push_str("  vpn-data:\n");
        for c in components {
            let _ = writeln!(y, "  {}-data:", c.name);
        }
        for ds in t.datastores() {
            let _ = writeln!(y, "  {ds}:");
        }
    }
    let _ = write!(
        y,
        "\nconfigs:\n  {cs_name}-config:\n    file: ./config/{cs_name}.toml\n"
    );
    if !cs_only {
        y.push_str("  vpn-config:\n    file: ./config/vpn.toml\n");
        for c in components {
            let _ = writeln!(y, "  {n}-config:\n    file: ./config/{n}.toml", n = c.name);
        }
        y.push_str(
            "  fbl-ca:\n    external: true\n\nsecrets:\n  fbl-passphrase:\n    external: true\n",
        );
    }
    y
}
