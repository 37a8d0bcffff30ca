//! `lab render`: a topology as containers, one container and one volume per component and
//! one volume per datastore, on two networks (`onprem`, `azure`) joined only by the vpn-link
//! container, with every component's config file. `deploy/compose.yaml` and `deploy/config/`
//! are this rendering of `deploy/topologies/default.toml` (a test keeps them so).
//!
//! Inside the containers every component has a fixed port of its own (the CS 7001 and 7002,
//! vpn-link's control API 7000, then 7010, 7020, ... in topology order: on-premises process
//! servers, master targets and hosts, then Azure's master targets, process servers and hosts),
//! so that vpn-link relays a component at the same port under its own name (`vpn:7020` is
//! mt-onprem reached from Azure).
//!
//! Written by hand, not through a YAML library: the file keeps comments and anchors a user
//! reads; `docker compose config` is the judge of its syntax (the container test runs it).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use failback_common::identity::Site;
use serde_json::json;

use crate::topology::{Os, TargetRole, Topology, settings_json};

/// What `lab render --to` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// A docker compose file (`docker compose up`, docker-compose v1 too).
    Compose,
    /// Docker Swarm stack files (`docker stack deploy`) for one node per site or more:
    /// `stack-cs.yaml` (the CS alone, deployed first) and `stack.yaml` (everything).
    Stack,
}

pub use crate::containers::{CS_API_PORT, CS_ENROLL_PORT, LAB_UID, LINK_CONTROL_PORT};

/// A component as a container.
struct Service {
    name: String,
    binary: &'static str,
    site: Site,
    port: u16,
    datastores: Vec<String>,
    config: serde_json::Value,
    comment: String,
    /// Declared for later (`start = false`): defined, not started.
    later: bool,
}

/// A topology rendered: the compose file, each component's config, and the names the
/// scripts of `deploy/` need (sourced by bash as `services.env`).
pub struct Rendered {
    /// `compose.yaml`, or for a stack `stack.yaml`.
    pub compose: String,
    /// For a stack: `stack-cs.yaml`, the CS alone (deployed first, so that the CA exists).
    pub stack_cs: Option<String>,
    pub configs: BTreeMap<String, String>,
    pub services_env: String,
}

fn cs_settings(site: Site) -> serde_json::Value {
    let host = match site {
        Site::Onprem => "cs",
        Site::Azure => "vpn",
    };
    json!({
        "address": format!("{host}:{CS_API_PORT}"),
        "enroll_address": format!("{host}:{CS_ENROLL_PORT}"),
        "ca_cert": "/trust/ca.pem",
        "passphrase_file": "/trust/passphrase",
    })
}

fn datastores(names: &[String]) -> serde_json::Value {
    names
        .iter()
        .map(|n| json!({"name": n, "path": format!("/datastores/{n}")}))
        .collect()
}

/// The components of `t` in port order, with their configs.
fn services(t: &Topology) -> anyhow::Result<Vec<Service>> {
    let (Some(onprem), Some(azure)) = (t.site(Site::Onprem), t.site(Site::Azure)) else {
        anyhow::bail!("the topology needs both sites");
    };
    let mut out = Vec::new();
    let mut next = 7010u16;
    let mut port = || {
        let p = next;
        next += 10;
        p
    };
    let reached_from_other = |site: Site, role: &str| {
        matches!(
            (site, role),
            (Site::Onprem, "process-server" | "master-target") | (Site::Azure, "master-target")
        )
    };
    let base = |name: &str, site: Site, port: u16, role: &str| {
        let mut advertise = serde_json::Map::new();
        advertise.insert(site.as_str().into(), json!(format!("{name}:{port}")));
        if reached_from_other(site, role) {
            advertise.insert(site.other().as_str().into(), json!(format!("vpn:{port}")));
        }
        json!({
            "name": name,
            "site": site.as_str(),
            "data_dir": "/data",
            "listen": format!("0.0.0.0:{port}"),
            "advertise": advertise,
            "cs": cs_settings(site),
        })
    };
    let merge = |cfg: &mut serde_json::Value, settings: &toml::Table| {
        for (k, v) in settings_json(settings) {
            cfg[k] = v;
        }
    };
    for site in [onprem, azure] {
        // On-premises: process servers before master targets; Azure the other way round.
        let ps_first = site.name == Site::Onprem;
        for pass in 0..2 {
            if (pass == 0) == ps_first {
                for ps in &site.process_servers {
                    let p = port();
                    let mut config = base(ps.name(), site.name, p, "process-server");
                    merge(&mut config, &ps.settings());
                    out.push(Service {
                        name: ps.name().to_string(),
                        binary: "process-server",
                        site: site.name,
                        port: p,
                        datastores: Vec::new(),
                        config,
                        later: !ps.starts(),
                        comment: match site.name {
                            Site::Onprem => "Process server of forward replication: agents -> here -> vpn -> the Azure target. Reached from Azure through vpn-link.".into(),
                            Site::Azure => "Process server in Azure: carries failback replication (reprotect from Azure) across vpn-link.".into(),
                        },
                    });
                }
            } else {
                for mt in &site.master_targets {
                    let p = port();
                    let mut config = base(&mt.name, site.name, p, "master-target");
                    config["datastore"] = datastores(&mt.datastores);
                    if mt.role == TargetRole::MasterTarget {
                        config["os"] = json!(mt.os.as_str());
                    }
                    merge(&mut config, &mt.settings);
                    out.push(Service {
                        name: mt.name.clone(),
                        binary: "master-target",
                        site: site.name,
                        port: p,
                        datastores: mt.datastores.clone(),
                        config,
                        later: false,
                        comment: match mt.role {
                            TargetRole::Target => "Azure's target storage: replicas of on-premises machines (reached from on-premises through vpn-link).".into(),
                            TargetRole::MasterTarget => format!(
                                "Master target ({} machines fail back through it): replicas in {}.",
                                if mt.os == Os::Linux { "Linux" } else { "Windows" },
                                mt.datastores.join(", ")
                            ),
                        },
                    });
                }
            }
        }
        for host in &site.hosts {
            let p = port();
            let mut config = base(&host.name, site.name, p, "host");
            config["datastore"] = datastores(&host.datastores);
            if !host.machines.is_empty() {
                config["machine"] = host
                    .machines
                    .iter()
                    .map(|m| {
                        let mut machine = json!({
                            "name": m.name,
                            "os": m.os.as_str(),
                            "datastore": host.datastores[0],
                            "disk": m.disks.iter().enumerate()
                                .map(|(i, size)| json!({"id": format!("disk{i}"), "size": size.as_u64()}))
                                .collect::<Vec<_>>(),
                        });
                        merge(&mut machine, &m.settings);
                        machine
                    })
                    .collect();
            }
            merge(&mut config, &host.settings);
            let machines: Vec<&str> = host.machines.iter().map(|m| m.name.as_str()).collect();
            out.push(Service {
                name: host.name.clone(),
                binary: "mobility-agent",
                site: site.name,
                port: p,
                datastores: host.datastores.clone(),
                config,
                later: false,
                comment: if machines.is_empty() {
                    format!(
                        "Host in {}: runs the VMs failed over or booted here (datastores {}).",
                        site.name.as_str(),
                        host.datastores.join(", ")
                    )
                } else {
                    format!(
                        "Host: runs {} (disks in {}). Its port serves the health service only.",
                        machines.join(", "),
                        host.datastores.join(", ")
                    )
                },
            });
        }
    }
    Ok(out)
}

fn toml_text(header: &str, config: serde_json::Value) -> anyhow::Result<String> {
    let v: toml::Value = toml::Value::try_from(config)?;
    Ok(format!("{header}{}", toml::to_string_pretty(&v)?))
}

/// Renders `t` for `target`.
pub fn render(t: &Topology, target: Target) -> anyhow::Result<Rendered> {
    let services = services(t)?;
    let generated = format!(
        "# Rendered from topology `{}` by `srctl lab render`; edit the topology, not this file.\n",
        t.name
    );
    let mut configs = BTreeMap::new();
    let cs_name = t.config_server().to_string();
    configs.insert(
        cs_name.clone(),
        toml_text(
            &format!(
                "{generated}# Configuration server (site onprem), reached as `cs` on network onprem. First start:\n# creates the lab CA and the passphrase in /data; the `trust` bootstrap publishes ca.pem and\n# passphrase (not the database, not the CA key) for the other components to enroll with.\n"
            ),
            json!({
                "data_dir": "/data",
                "enroll_listen": format!("0.0.0.0:{CS_ENROLL_PORT}"),
                "api_listen": format!("0.0.0.0:{CS_API_PORT}"),
                "advertise": format!("cs:{CS_API_PORT}"),
            }),
        )?,
    );
    // vpn-link: the CS from Azure, on-premises PSs and MTs from Azure, Azure's MTs from
    // on-premises; each at its own port.
    let mut routes = vec![
        json!({"name": "cs-enroll", "from_site": "azure", "listen": format!("0.0.0.0:{CS_ENROLL_PORT}"), "connect": format!("cs:{CS_ENROLL_PORT}")}),
        json!({"name": "cs-api", "from_site": "azure", "listen": format!("0.0.0.0:{CS_API_PORT}"), "connect": format!("cs:{CS_API_PORT}")}),
    ];
    for s in &services {
        let from = match (s.site, s.binary) {
            (Site::Onprem, "process-server" | "master-target") => Site::Azure,
            (Site::Azure, "master-target") => Site::Onprem,
            _ => continue,
        };
        routes.push(json!({
            "name": s.name,
            "from_site": from.as_str(),
            "listen": format!("0.0.0.0:{}", s.port),
            "connect": format!("{}:{}", s.name, s.port),
        }));
    }
    let mut vpn = json!({
        "name": crate::labfile::LINK_NAME,
        "data_dir": "/data",
        "control_listen": format!("0.0.0.0:{LINK_CONTROL_PORT}"),
        "cs": cs_settings(Site::Onprem),
        "route": routes,
    });
    if !t.link.is_empty() {
        vpn["shaping"] = serde_json::to_value(&t.link)?;
    }
    configs.insert(
        "vpn".into(),
        toml_text(
            &format!(
                "{generated}# vpn-link: the only container on both networks. Its control API (srctl link ...) is mutual TLS, operators only, published to the host.\n"
            ),
            vpn,
        )?,
    );
    for s in &services {
        configs.insert(
            s.name.clone(),
            toml_text(&format!("{generated}# {}\n", s.comment), s.config.clone())?,
        );
    }
    let (compose, stack_cs) = match target {
        Target::Compose => (compose(t, &cs_name, &services), None),
        Target::Stack => (
            crate::stack::stack(t, &cs_name, &services_of(&services), false),
            Some(crate::stack::stack(
                t,
                &cs_name,
                &services_of(&services),
                true,
            )),
        ),
    };
    Ok(Rendered {
        compose,
        stack_cs,
        configs,
        services_env: services_env(t, &cs_name, &services),
    })
}

/// The components as the stack renderer sees them.
fn services_of(services: &[Service]) -> Vec<crate::containers::Component> {
    services
        .iter()
        .map(|s| crate::containers::Component {
            name: s.name.clone(),
            binary: s.binary,
            site: s.site,
            port: s.port,
            datastores: s.datastores.clone(),
            later: s.later,
        })
        .collect()
}

/// `services.env`: what `deploy/lib.sh` and `deploy/topology-test` need to know of the
/// topology: what must be connected before the lab is up, the component that plays each part
/// in the container test's faults and isolation checks, and each component's port.
fn services_env(t: &Topology, cs_name: &str, services: &[Service]) -> String {
    let first = |site: Site, binary: &str, target: Option<bool>| {
        services
            .iter()
            .find(|s| {
                s.site == site
                    && s.binary == binary
                    && target.is_none_or(|want| {
                        let is_target = t
                            .site(site)
                            .and_then(|x| x.master_targets.iter().find(|m| m.name == s.name))
                            .is_some_and(|m| m.role == TargetRole::Target);
                        is_target == want
                    })
            })
            .map(|s| s.name.clone())
            .unwrap_or_default()
    };
    let mut expected = vec![crate::labfile::LINK_NAME.to_string()];
    expected.extend(services.iter().filter(|s| !s.later).map(|s| s.name.clone()));
    expected.extend(t.machines());
    let later: Vec<&Service> = services.iter().filter(|s| s.later).collect();
    let mut e = format!(
        "# Rendered from topology `{}` by `srctl lab render`; sourced by deploy/lib.sh.\n",
        t.name
    );
    let _ = writeln!(
        e,
        "# Everything that must show \"connected\" before the lab is up."
    );
    let _ = writeln!(e, "FBL_EXPECTED=({})", expected.join(" "));
    let _ = writeln!(
        e,
        "# The components the container test's faults and checks act on."
    );
    let _ = writeln!(e, "FBL_CS={cs_name}");
    let _ = writeln!(
        e,
        "FBL_ONPREM_PS={}",
        first(Site::Onprem, "process-server", None)
    );
    let _ = writeln!(
        e,
        "FBL_ONPREM_MT={}",
        first(Site::Onprem, "master-target", None)
    );
    let _ = writeln!(
        e,
        "FBL_AZURE_PS={}",
        first(Site::Azure, "process-server", None)
    );
    let _ = writeln!(
        e,
        "FBL_AZURE_TARGET={}",
        first(Site::Azure, "master-target", Some(true))
    );
    let _ = writeln!(
        e,
        "# Declared for later (started by `srctl infra add process-server NAME --site SITE`)."
    );
    let _ = writeln!(
        e,
        "FBL_LATER=({})",
        later
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let _ = writeln!(
        e,
        "FBL_LATER_SITES=({})",
        later
            .iter()
            .map(|s| s.site.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let _ = writeln!(e, "# Each component's port inside its container.");
    let _ = writeln!(e, "declare -A FBL_PORT=(");
    let _ = writeln!(e, "    [{cs_name}]={CS_API_PORT}");
    for s in services {
        let _ = writeln!(e, "    [{}]={}", s.name, s.port);
    }
    let _ = writeln!(e, ")");
    e
}

/// The compose file.
fn compose(t: &Topology, cs_name: &str, services: &[Service]) -> String {
    let mut y = String::new();
    let names = |site: Site| -> String {
        let mut n: Vec<&str> = Vec::new();
        if site == Site::Onprem {
            n.push(cs_name);
        }
        n.extend(
            services
                .iter()
                .filter(|s| s.site == site)
                .map(|s| s.name.as_str()),
        );
        n.join(", ")
    };
    let _ = write!(
        y,
        "# Failback Lab as containers: topology `{name}` (rendered by `srctl lab render -t FILE`;\n\
         # deploy/compose.yaml is the rendering of deploy/topologies/default.toml), one container\n\
         # and one volume per component and per datastore, two networks joined only by vpn-link.\n\
         #\n\
         #   fbl-onprem: {onprem}  (+ vpn)\n\
         #   fbl-azure:  {azure}  (+ vpn)\n\
         #\n\
         # Azure-side components reach the CS and on-premises process servers and master targets\n\
         # only at `vpn:PORT`; on-premises ones reach Azure's targets only at `vpn:PORT` (the routes\n\
         # are in config/vpn.toml). Docker isolates two bridge networks from each other, so there\n\
         # is no other path.\n\
         #\n\
         # Images: `deploy/build-images` (offline) or `docker build -f deploy/Dockerfile` (registry);\n\
         # both make ${{FBL_IMAGE:-failback-lab:latest}}. Start it with `deploy/lab up`, which also\n\
         # writes the directory srctl uses (see deploy/README.md); plain `docker-compose up -d` works\n\
         # too (docker-compose v1 and `docker compose` v2 alike).\n\
         #\n\
         # Readiness: every mutual-TLS port answers a TLS handshake (`fbl-helper probe-tls`; the\n\
         # components serve grpc.health.v1 there, which needs a lab client certificate), vpn-link's\n\
         # control port included (mutual TLS, operators only). Components start once the CS is\n\
         # healthy and the `trust` bootstrap has published the CA certificate and the passphrase;\n\
         # Azure ones also wait for vpn-link.\n\n",
        name = t.name,
        onprem = names(Site::Onprem),
        azure = names(Site::Azure),
    );
    y.push_str(
        "x-component: &component\n  image: ${FBL_IMAGE:-failback-lab:latest}\n  environment:\n    RUST_LOG: ${RUST_LOG:-info}\n  restart: \"no\"\n  stop_grace_period: 10s\n\n\
         x-health: &health\n  interval: 1s\n  timeout: 3s\n  retries: 180\n\n\
         x-onprem-deps: &onprem-deps\n  trust:\n    condition: service_completed_successfully\n  datastores:\n    condition: service_completed_successfully\n\n\
         x-azure-deps: &azure-deps\n  trust:\n    condition: service_completed_successfully\n  datastores:\n    condition: service_completed_successfully\n  vpn:\n    condition: service_healthy\n\n\
         services:\n",
    );
    let _ = write!(
        y,
        "  {cs_name}:\n    <<: *component\n    container_name: fbl-{cs_name}\n    hostname: cs\n    \
         command: [\"config-server\", \"run\", \"--config\", \"/config/{cs_name}.toml\"]\n    \
         volumes:\n      - {cs_name}-data:/data\n      - ./config/{cs_name}.toml:/config/{cs_name}.toml:ro\n    \
         networks: [onprem]\n    ports:\n      # The host's srctl: enrollment of the operator, then the operator API.\n      \
         - \"127.0.0.1:${{FBL_CS_ENROLL_PORT:-17001}}:{CS_ENROLL_PORT}\"\n      \
         - \"127.0.0.1:${{FBL_CS_API_PORT:-17002}}:{CS_API_PORT}\"\n    \
         healthcheck:\n      <<: *health\n      test: [\"CMD\", \"fbl-helper\", \"probe-tls\", \"127.0.0.1:{CS_ENROLL_PORT}\", \"127.0.0.1:{CS_API_PORT}\"]\n\n"
    );
    let _ = write!(
        y,
        "  # One-shot bootstrap: copies ca.pem and passphrase (not the database with the CA key) from\n  \
         # the CS volume to the `trust` volume every other component mounts read-only.\n  \
         trust:\n    <<: *component\n    container_name: fbl-trust\n    \
         command: [\"fbl-helper\", \"publish-trust\", \"/cs\", \"/trust\"]\n    network_mode: none\n    \
         volumes:\n      - {cs_name}-data:/cs:ro\n      - trust:/trust\n    \
         depends_on:\n      {cs_name}:\n        condition: service_healthy\n\n"
    );
    let ds: Vec<String> = t.datastores().into_iter().collect();
    let _ = write!(
        y,
        "  # One-shot: hands the datastore volumes to the lab's user (uid {LAB_UID}). Docker creates a\n  \
         # new volume's root owned by root unless the image has the mount point, and datastores are\n  \
         # named by the topology.\n  \
         datastores:\n    <<: *component\n    container_name: fbl-datastores\n    user: \"0:0\"\n    \
         command: [\"fbl-helper\", \"own\", \"{LAB_UID}\"{paths}]\n    network_mode: none\n    volumes:\n{mounts}\n",
        paths = ds
            .iter()
            .map(|d| format!(", \"/datastores/{d}\""))
            .collect::<String>(),
        mounts = ds
            .iter()
            .map(|d| format!("      - {d}:/datastores/{d}\n"))
            .collect::<String>(),
    );
    let _ = write!(
        y,
        "  vpn:\n    <<: *component\n    container_name: fbl-vpn\n    hostname: vpn\n    \
         command: [\"vpn-link\", \"--config\", \"/config/vpn.toml\"]\n    \
         volumes:\n      - vpn-data:/data\n      - trust:/trust:ro\n      - ./config/vpn.toml:/config/vpn.toml:ro\n    \
         depends_on: *onprem-deps\n    networks:\n      \
         # Fixed addresses, so that `docker network connect --ip` after a disconnect gives the\n      \
         # link its address back (deploy/topology-test does).\n      \
         onprem:\n        ipv4_address: ${{FBL_NET_PREFIX:-10.213}}.1.254\n        aliases: [vpn]\n      \
         azure:\n        ipv4_address: ${{FBL_NET_PREFIX:-10.213}}.2.254\n        aliases: [vpn]\n    \
         ports:\n      - \"127.0.0.1:${{FBL_LINK_CONTROL_PORT:-17000}}:{LINK_CONTROL_PORT}\"\n    \
         healthcheck:\n      <<: *health\n      test: [\"CMD\", \"fbl-helper\", \"probe-tls\", \"127.0.0.1:{LINK_CONTROL_PORT}\"]\n\n"
    );
    for s in services {
        let mut volumes = format!("      - {}-data:/data\n", s.name);
        for ds in &s.datastores {
            let _ = writeln!(volumes, "      - {ds}:/datastores/{ds}");
        }
        let _ = writeln!(volumes, "      - trust:/trust:ro");
        let _ = writeln!(
            volumes,
            "      - ./config/{n}.toml:/config/{n}.toml:ro",
            n = s.name
        );
        let later = if s.later {
            "    # Deployed later: `srctl infra add process-server NAME` and `deploy/lab add NAME`.\n    \
             profiles: [later]\n"
        } else {
            ""
        };
        let _ = write!(
            y,
            "  {n}:\n    <<: *component\n    container_name: fbl-{n}\n    hostname: {n}\n{later}    \
             command: [\"{b}\", \"--config\", \"/config/{n}.toml\"]\n    volumes:\n{volumes}    \
             networks: [{site}]\n    depends_on: *{site}-deps\n    healthcheck:\n      <<: *health\n      \
             test: [\"CMD\", \"fbl-helper\", \"probe-tls\", \"127.0.0.1:{p}\"]\n\n",
            n = s.name,
            b = s.binary,
            site = s.site.as_str(),
            p = s.port,
        );
    }
    y.push_str(
        "networks:\n  onprem:\n    name: fbl-onprem\n    ipam:\n      config:\n        - subnet: ${FBL_NET_PREFIX:-10.213}.1.0/24\n  \
         azure:\n    name: fbl-azure\n    ipam:\n      config:\n        - subnet: ${FBL_NET_PREFIX:-10.213}.2.0/24\n\n\
         volumes:\n",
    );
    let _ = writeln!(y, "  {cs_name}-data:\n  trust:\n  vpn-data:");
    for s in services {
        let _ = writeln!(y, "  {}-data:", s.name);
    }
    for ds in t.datastores() {
        let users: Vec<&str> = services
            .iter()
            .filter(|s| s.datastores.contains(&ds))
            .map(|s| s.name.as_str())
            .collect();
        let _ = writeln!(y, "  {ds}:    # datastore: {}", users.join(" and "));
    }
    y
}

/// Writes `DIR/compose.yaml` (or `DIR/stack.yaml` and `DIR/stack-cs.yaml`),
/// `DIR/config/NAME.toml` and `DIR/services.env`.
pub fn write(r: &Rendered, dir: &Path) -> anyhow::Result<()> {
    let config = dir.join("config");
    std::fs::create_dir_all(&config)
        .with_context(|| format!("cannot create {}", config.display()))?;
    let put = |path: &Path, text: &str| {
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
    };
    match &r.stack_cs {
        None => put(&dir.join("compose.yaml"), &r.compose)?,
        Some(cs) => {
            put(&dir.join("stack.yaml"), &r.compose)?;
            put(&dir.join("stack-cs.yaml"), cs)?;
        }
    }
    for (name, text) in &r.configs {
        put(&config.join(format!("{name}.toml")), text)?;
    }
    put(&dir.join("services.env"), &r.services_env)
}
