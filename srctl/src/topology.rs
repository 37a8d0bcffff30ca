//! Topology files: the shape of a lab (sites, configuration server, process servers, master
//! targets, hosts with their machines and disks, the link) in one TOML file, parsed and checked
//! before anything starts. `lab up -t FILE` starts what a file describes; `lab up` without one
//! uses [`Topology::generated`] (the default shape: `deploy/topologies/default.toml`);
//! `lab graph` draws it ([`Topology::mermaid`]).
//!
//! ```toml
//! name = "two-hosts"
//! [link]                       # the VPN's shaping at start (vpn-link's [shaping] keys)
//! latency = "20ms"
//!
//! [[site]]
//! name = "onprem"              # ASR's two sites: onprem and azure
//! config_server = "cs"         # onprem only, required there
//! process_servers = ["ps-1", { name = "ps-2", settings = { cache_capacity = "1GiB" } }]
//! master_targets = [{ name = "mt-lin", os = "linux", datastores = ["ds-b"] }]
//! hosts = [{ name = "esx-b", datastores = ["ds-b"], machines = [
//!     { name = "web1", os = "linux", disks = ["32MiB", "16MiB"] } ] }]
//! ```
//! Every component and machine may carry `settings`, a table of its own config keys (merged
//! into its config file). Errors name the file, the key and what to do.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use failback_common::identity::{Site, validate_name};
use serde::{Deserialize, Serialize};

/// A machine's or a master target's operating system (reprotect pairs them).
pub use failback_common::os::Os;

/// What a master target is for: a VM-backed master target, or Azure's target storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetRole {
    #[default]
    MasterTarget,
    Target,
}

/// A process server: a name, or a name with settings. `start = false` declares one deployed
/// later, as seed 004's Azure process server for failback: defined (its config written, its
/// container scaled to zero) but started only by `srctl infra add process-server NAME`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ProcessServer {
    Name(String),
    Full {
        name: String,
        #[serde(default)]
        settings: toml::Table,
        #[serde(default = "yes", skip_serializing_if = "is_true")]
        start: bool,
    },
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

impl ProcessServer {
    pub fn name(&self) -> &str {
        match self {
            ProcessServer::Name(n) | ProcessServer::Full { name: n, .. } => n,
        }
    }

    pub fn settings(&self) -> toml::Table {
        match self {
            ProcessServer::Name(_) => toml::Table::new(),
            ProcessServer::Full { settings, .. } => settings.clone(),
        }
    }

    /// Whether the lab starts it (false: deployed later with `infra add`).
    pub fn starts(&self) -> bool {
        match self {
            ProcessServer::Name(_) => true,
            ProcessServer::Full { start, .. } => *start,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MasterTarget {
    pub name: String,
    #[serde(default)]
    pub os: Os,
    #[serde(default)]
    pub role: TargetRole,
    pub datastores: Vec<String>,
    #[serde(default)]
    pub settings: toml::Table,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    pub name: String,
    #[serde(default)]
    pub os: Os,
    /// Disk sizes, e.g. "64MiB": disk0, disk1, ...
    pub disks: Vec<bytesize::ByteSize>,
    #[serde(default)]
    pub settings: toml::Table,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    pub name: String,
    pub datastores: Vec<String>,
    #[serde(default)]
    pub machines: Vec<Machine>,
    #[serde(default)]
    pub settings: toml::Table,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteSpec {
    pub name: Site,
    #[serde(default)]
    pub config_server: Option<String>,
    #[serde(default)]
    pub process_servers: Vec<ProcessServer>,
    #[serde(default)]
    pub master_targets: Vec<MasterTarget>,
    #[serde(default)]
    pub hosts: Vec<Host>,
}

/// A topology, as written (after [`Topology::load`], also checked).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    pub name: String,
    /// vpn-link's `[shaping]` keys at start (latency, jitter, bandwidth, ...).
    #[serde(default)]
    pub link: toml::Table,
    pub site: Vec<SiteSpec>,
}

/// A topology file that can't be used: the file, the key, what is wrong and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {message}")]
pub struct TopologyError {
    pub file: String,
    pub key: String,
    pub message: String,
}

/// Disks a machine may have: a VMware VM's limit, and what ASR's master target takes per VM.
pub const MAX_DISKS_PER_MACHINE: usize = 60;
/// Disks one on-premises master target serves (ASR: 60; the CS's `master_target_disk_limit`):
/// a generated lab has as many as failing back every machine takes.
pub const DISKS_PER_MASTER_TARGET: usize = 60;

impl Topology {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Topology, TopologyError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| TopologyError {
            file: file.clone(),
            key: "-".into(),
            message: format!("cannot read it: {e}"),
        })?;
        Topology::parse(&text, &file)
    }

    /// Parses and checks `text` (`file` names it in errors).
    pub fn parse(text: &str, file: &str) -> Result<Topology, TopologyError> {
        let topology: Topology = toml::from_str(text).map_err(|e| TopologyError {
            file: file.to_string(),
            key: e
                .span()
                .map(|s| format!("line {}", text[..s.start].lines().count().max(1)))
                .unwrap_or_else(|| "-".into()),
            message: e.message().to_string(),
        })?;
        topology.check().map_err(|(key, message)| TopologyError {
            file: file.to_string(),
            key,
            message,
        })?;
        Ok(topology)
    }

    /// The default shape with `machines` machines spread over `hosts` hosts (esx-1..esx-H,
    /// vm1..vmN round robin), one disk of `disk_size` each: today's lab for one host.
    pub fn generated(machines: usize, hosts: usize, disk_size: u64) -> Result<Topology, String> {
        Topology::sized(machines, hosts, 1, disk_size)
    }

    /// The default shape with `machines` machines spread over `hosts` hosts (esx-1..esx-H,
    /// vm1..vmN round robin), each with `disks` disks of `disk_size`, and as many on-premises
    /// master targets (mt-onprem, mt-onprem-2, ...) as failing all of them back takes. A shape that can't be
    /// run is an error naming the option (`--machines`, `--hosts`, `--disks-per-machine`,
    /// `--disk-size`) and what to use instead.
    pub fn sized(
        machines: usize,
        hosts: usize,
        disks: usize,
        disk_size: u64,
    ) -> Result<Topology, String> {
        if machines == 0 {
            return Err(
                "--machines must be at least 1: a lab without machines has nothing to \
                        replicate"
                    .into(),
            );
        }
        if hosts == 0 {
            return Err("--hosts must be at least 1: machines run on hosts".into());
        }
        if disks == 0 || disks > MAX_DISKS_PER_MACHINE {
            return Err(format!(
                "--disks-per-machine must be 1 to {MAX_DISKS_PER_MACHINE} (a VM's disks on \
                 VMware, and what a master target can take per VM), not {disks}"
            ));
        }
        if disk_size == 0 || !disk_size.is_multiple_of(4096) {
            return Err(format!(
                "--disk-size must be a positive whole number of 4 KiB blocks, not {disk_size} \
                 bytes (e.g. 16MiB)"
            ));
        }
        let hosts = hosts.max(1);
        let mut onprem_hosts: Vec<Host> = (1..=hosts)
            .map(|h| Host {
                name: format!("esx-{h}"),
                datastores: vec!["ds-onprem".into()],
                machines: Vec::new(),
                settings: toml::Table::new(),
            })
            .collect();
        for i in 1..=machines {
            onprem_hosts[(i - 1) % hosts].machines.push(Machine {
                name: format!("vm{i}"),
                os: Os::Windows,
                disks: vec![bytesize::ByteSize::b(disk_size); disks],
                settings: toml::Table::new(),
            });
        }
        let topology = Topology {
            name: "default".into(),
            link: toml::Table::new(),
            site: vec![
                SiteSpec {
                    name: Site::Onprem,
                    config_server: Some("cs".into()),
                    process_servers: vec![ProcessServer::Name("ps-onprem".into())],
                    master_targets: onprem_master_targets(
                        (machines * disks).div_ceil(DISKS_PER_MASTER_TARGET),
                    ),
                    hosts: onprem_hosts,
                },
                SiteSpec {
                    name: Site::Azure,
                    config_server: None,
                    process_servers: vec![
                        ProcessServer::Name("ps-azure".into()),
                        ProcessServer::Full {
                            name: "ps-azure-2".into(),
                            settings: toml::Table::new(),
                            start: false,
                        },
                    ],
                    master_targets: vec![MasterTarget {
                        name: "azure-target".into(),
                        os: Os::Windows,
                        role: TargetRole::Target,
                        datastores: vec!["azure-storage".into()],
                        settings: toml::Table::new(),
                    }],
                    hosts: vec![Host {
                        name: "azure-compute".into(),
                        datastores: vec!["azure-storage".into()],
                        machines: Vec::new(),
                        settings: toml::Table::new(),
                    }],
                },
            ],
        };
        topology
            .check()
            .map_err(|(key, message)| format!("{key}: {message}"))?;
        Ok(topology)
    }

    /// The default shape with `n` on-premises master targets (`--master-targets`) instead of
    /// as many as failing back every machine takes.
    pub fn with_master_targets(mut self, n: usize) -> Result<Topology, String> {
        if n == 0 {
            return Err(
                "--master-targets must be at least 1: failback writes through a master target \
                 on-premises"
                    .into(),
            );
        }
        if let Some(onprem) = self.site.iter_mut().find(|s| s.name == Site::Onprem) {
            onprem.master_targets = onprem_master_targets(n);
        }
        self.check()
            .map_err(|(key, message)| format!("{key}: {message}"))?;
        Ok(self)
    }

    /// The site `site`, if the topology has it.
    pub fn site(&self, site: Site) -> Option<&SiteSpec> {
        self.site.iter().find(|s| s.name == site)
    }

    /// The configuration server's name.
    pub fn config_server(&self) -> &str {
        self.site
            .iter()
            .find_map(|s| s.config_server.as_deref())
            .unwrap_or("cs")
    }

    /// Every datastore, each once, sorted.
    pub fn datastores(&self) -> BTreeSet<String> {
        let mut all = BTreeSet::new();
        for s in &self.site {
            for m in &s.master_targets {
                all.extend(m.datastores.iter().cloned());
            }
            for h in &s.hosts {
                all.extend(h.datastores.iter().cloned());
            }
        }
        all
    }

    /// Every machine name, in file order.
    pub fn machines(&self) -> Vec<String> {
        self.site
            .iter()
            .flat_map(|s| s.hosts.iter())
            .flat_map(|h| h.machines.iter().map(|m| m.name.clone()))
            .collect()
    }

    /// Checks what the file says; the first problem as (key, message).
    fn check(&self) -> Result<(), (String, String)> {
        let err = |key: String, message: String| Err((key, message));
        validate_name(&self.name).map_err(|m| ("name".to_string(), m))?;
        // The link's keys are vpn-link's [shaping] keys, checked as vpn-link checks them.
        let shaping: vpn_link::config::ShapingConfig = toml::Value::Table(self.link.clone())
            .try_into()
            .map_err(|e: toml::de::Error| ("link".to_string(), e.message().to_string()))?;
        shaping
            .validate()
            .map_err(|(k, m)| (format!("link.{k}"), m))?;
        let mut seen_sites = BTreeSet::new();
        let mut names: HashMap<String, String> = HashMap::new();
        let mut claim = |key: String, name: &str| -> Result<(), (String, String)> {
            validate_name(name).map_err(|m| (key.clone(), m))?;
            if let Some(first) = names.insert(name.to_ascii_lowercase(), key.clone()) {
                return Err((
                    key,
                    format!(
                        "`{name}` is also the name at {first}: every component and machine \
                         needs a name of its own (case does not count)"
                    ),
                ));
            }
            Ok(())
        };
        for (i, site) in self.site.iter().enumerate() {
            let at = |k: &str| format!("site[{i}].{k}");
            if !seen_sites.insert(site.name) {
                return err(
                    at("name"),
                    format!(
                        "site `{}` appears twice: describe each site once",
                        site.name
                    ),
                );
            }
            match (&site.config_server, site.name) {
                (Some(cs), Site::Onprem) => claim(at("config_server"), cs)?,
                (Some(_), Site::Azure) => {
                    return err(
                        at("config_server"),
                        "the configuration server runs on-premises (as ASR's): move it to the \
                         onprem site"
                            .into(),
                    );
                }
                (None, Site::Onprem) => {
                    return err(
                        at("config_server"),
                        "the onprem site needs a configuration server: add `config_server = \"cs\"`"
                            .into(),
                    );
                }
                (None, Site::Azure) => {}
            }
            for (j, ps) in site.process_servers.iter().enumerate() {
                claim(at(&format!("process_servers[{j}]")), ps.name())?;
            }
            for (j, mt) in site.master_targets.iter().enumerate() {
                claim(at(&format!("master_targets[{j}].name")), &mt.name)?;
                if mt.datastores.is_empty() {
                    return err(
                        at(&format!("master_targets[{j}].datastores")),
                        format!(
                            "master target `{}` sees no datastore: name at least one",
                            mt.name
                        ),
                    );
                }
                if mt.role == TargetRole::Target && site.name == Site::Onprem {
                    return err(
                        at(&format!("master_targets[{j}].role")),
                        "role \"target\" is Azure's target storage: use it on the azure site"
                            .into(),
                    );
                }
            }
            for (j, host) in site.hosts.iter().enumerate() {
                claim(at(&format!("hosts[{j}].name")), &host.name)?;
                if host.datastores.is_empty() {
                    return err(
                        at(&format!("hosts[{j}].datastores")),
                        format!("host `{}` sees no datastore: name at least one", host.name),
                    );
                }
                for (k, m) in host.machines.iter().enumerate() {
                    let mk = |f: &str| at(&format!("hosts[{j}].machines[{k}].{f}"));
                    claim(mk("name"), &m.name)?;
                    if m.disks.is_empty() {
                        return err(
                            mk("disks"),
                            format!("machine `{}` has no disk: give at least one size", m.name),
                        );
                    }
                    if m.disks.len() > MAX_DISKS_PER_MACHINE {
                        return err(
                            mk("disks"),
                            format!(
                                "machine `{}` has {} disks; a VM has at most \
                                 {MAX_DISKS_PER_MACHINE} (VMware, and a master target's limit)",
                                m.name,
                                m.disks.len()
                            ),
                        );
                    }
                    for (d, size) in m.disks.iter().enumerate() {
                        if size.as_u64() == 0 || size.as_u64() % 4096 != 0 {
                            return err(
                                mk(&format!("disks[{d}]")),
                                format!("{size} is not a whole number of 4 KiB blocks"),
                            );
                        }
                    }
                }
            }
            // Every datastore of the site is seen by a host (to run or boot machines) and by
            // a master target (to hold replicas and take seeds).
            let by_hosts: BTreeSet<&String> = site
                .hosts
                .iter()
                .flat_map(|h| h.datastores.iter())
                .collect();
            let by_targets: BTreeSet<&String> = site
                .master_targets
                .iter()
                .flat_map(|m| m.datastores.iter())
                .collect();
            for (j, host) in site.hosts.iter().enumerate() {
                if let Some(ds) = host.datastores.iter().find(|d| !by_targets.contains(d)) {
                    return err(
                        at(&format!("hosts[{j}].datastores")),
                        format!(
                            "datastore `{ds}` of host `{}` is seen by no master target of site {}: \
                             add it to a master target's datastores",
                            host.name, site.name
                        ),
                    );
                }
            }
            for (j, mt) in site.master_targets.iter().enumerate() {
                if let Some(ds) = mt.datastores.iter().find(|d| !by_hosts.contains(d)) {
                    return err(
                        at(&format!("master_targets[{j}].datastores")),
                        format!(
                            "datastore `{ds}` of master target `{}` is seen by no host of site {}: \
                             add it to a host's datastores",
                            mt.name, site.name
                        ),
                    );
                }
            }
        }
        let Some(onprem) = self.site(Site::Onprem) else {
            return err(
                "site".into(),
                "no onprem site: describe the on-premises site (with the configuration server)"
                    .into(),
            );
        };
        let Some(azure) = self.site(Site::Azure) else {
            return err(
                "site".into(),
                "no azure site: describe the Azure site (a target and a host to fail over to)"
                    .into(),
            );
        };
        if onprem.process_servers.is_empty() || onprem.master_targets.is_empty() {
            return err(
                "site[onprem]".into(),
                "the onprem site needs a process server (replication) and a master target \
                 (failback)"
                    .into(),
            );
        }
        if !azure
            .master_targets
            .iter()
            .any(|m| m.role == TargetRole::Target)
            || azure.hosts.is_empty()
        {
            return err(
                "site[azure]".into(),
                "the azure site needs a master target with role = \"target\" (the target storage) \
                 and a host (where failed-over VMs run)"
                    .into(),
            );
        }
        Ok(())
    }

    /// The topology as a Mermaid flowchart: a subgraph per site with its components and
    /// machines, the link between them, and who sends to whom.
    pub fn mermaid(&self) -> String {
        let id = |n: &str| n.replace('-', "_");
        let mut out = String::from("flowchart LR\n");
        for site in &self.site {
            let _ = writeln!(out, "  subgraph {}[\"{}\"]", site.name, site.name);
            if let Some(cs) = &site.config_server {
                let _ = writeln!(out, "    {}[\"{cs}<br/>configuration server\"]", id(cs));
            }
            for ps in &site.process_servers {
                let n = ps.name();
                let later = if ps.starts() {
                    ""
                } else {
                    "<br/>(deployed later)"
                };
                let _ = writeln!(out, "    {}[\"{n}<br/>process server{later}\"]", id(n));
            }
            for mt in &site.master_targets {
                let what = match mt.role {
                    TargetRole::Target => "target storage".to_string(),
                    TargetRole::MasterTarget => format!("master target ({})", mt.os.as_str()),
                };
                let _ = writeln!(
                    out,
                    "    {}[(\"{}<br/>{what}<br/>{}\")]",
                    id(&mt.name),
                    mt.name,
                    mt.datastores.join(", ")
                );
            }
            for h in &site.hosts {
                let _ = writeln!(out, "    subgraph {}[\"host {}\"]", id(&h.name), h.name);
                for m in &h.machines {
                    let disks: Vec<String> = m.disks.iter().map(|d| d.to_string()).collect();
                    let _ = writeln!(
                        out,
                        "      {}([\"{} ({})<br/>{}\"])",
                        id(&m.name),
                        m.name,
                        m.os.as_str(),
                        disks.join(" + ")
                    );
                }
                let _ = writeln!(out, "    end");
            }
            let _ = writeln!(out, "  end");
        }
        let _ = writeln!(out, "  vpn{{{{\"vpn-link\"}}}}");
        if let (Some(onprem), Some(azure)) = (self.site(Site::Onprem), self.site(Site::Azure)) {
            let cs = id(self.config_server());
            let _ = writeln!(out, "  onprem === vpn === azure");
            if let Some(ps) = onprem.process_servers.first() {
                for h in &onprem.hosts {
                    let _ = writeln!(out, "  {} -- replicate --> {}", id(&h.name), id(ps.name()));
                }
                if let Some(t) = azure
                    .master_targets
                    .iter()
                    .find(|m| m.role == TargetRole::Target)
                {
                    let _ = writeln!(out, "  {} -- via vpn --> {}", id(ps.name()), id(&t.name));
                }
            }
            if let (Some(ps), Some(mt)) =
                (azure.process_servers.first(), onprem.master_targets.first())
            {
                for h in &azure.hosts {
                    let _ = writeln!(out, "  {} -. failback .-> {}", id(&h.name), id(ps.name()));
                }
                let _ = writeln!(out, "  {} -. via vpn .-> {}", id(ps.name()), id(&mt.name));
            }
            let _ = writeln!(out, "  vpn -. control .-> {cs}");
        }
        out
    }
}

/// The default shape's on-premises master targets: mt-onprem, mt-onprem-2, ... (Windows, on
/// `ds-onprem`).
fn onprem_master_targets(n: usize) -> Vec<MasterTarget> {
    (1..=n.max(1))
        .map(|i| MasterTarget {
            name: if i == 1 {
                "mt-onprem".into()
            } else {
                format!("mt-onprem-{i}")
            },
            os: Os::Windows,
            role: TargetRole::MasterTarget,
            datastores: vec!["ds-onprem".into()],
            settings: toml::Table::new(),
        })
        .collect()
}

/// Where a topology's files go in a lab directory.
pub fn datastore_dir(dir: &Path, datastore: &str) -> PathBuf {
    dir.join("datastores").join(datastore)
}

/// The settings of one component or machine as JSON, to merge into its generated config.
pub fn settings_json(settings: &toml::Table) -> BTreeMap<String, serde_json::Value> {
    settings
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), serde_json::to_value(v).ok()?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../deploy/topologies/two-hosts.toml");

    #[test]
    fn the_documented_example_parses() {
        let t = Topology::parse(EXAMPLE, "two-hosts.toml").expect("valid");
        assert_eq!(t.name, "two-hosts");
        assert_eq!(t.machines(), vec!["sql1", "app1", "web1", "web2"]);
        let onprem = t.site(Site::Onprem).expect("onprem");
        assert_eq!(onprem.process_servers.len(), 2);
        assert_eq!(onprem.master_targets[1].os, Os::Linux);
        assert!(t.mermaid().contains("web2 (linux)"));
    }

    #[test]
    fn the_default_file_is_the_generated_default() {
        let file = include_str!("../../deploy/topologies/default.toml");
        let t = Topology::parse(file, "default.toml").expect("valid");
        let g = Topology::generated(2, 1, 64 << 20).expect("valid");
        assert_eq!(t.machines(), g.machines());
        assert_eq!(t.datastores(), g.datastores());
        assert_eq!(t.mermaid(), g.mermaid());
    }

    #[test]
    fn the_generated_shape_has_a_master_target_per_60_disks() {
        let names = |t: &Topology| -> Vec<String> {
            t.site(Site::Onprem)
                .expect("onprem")
                .master_targets
                .iter()
                .map(|m| m.name.clone())
                .collect()
        };
        let t = |m, d| Topology::sized(m, 2, d, 1 << 20).expect("valid");
        assert_eq!(names(&t(60, 1)), ["mt-onprem"]);
        assert_eq!(names(&t(61, 1)), ["mt-onprem", "mt-onprem-2"]);
        assert_eq!(names(&t(100, 1)), ["mt-onprem", "mt-onprem-2"]);
        assert_eq!(
            names(&t(40, 4)),
            ["mt-onprem", "mt-onprem-2", "mt-onprem-3"]
        );
        let two = t(3, 1).with_master_targets(2).expect("valid");
        assert_eq!(names(&two), ["mt-onprem", "mt-onprem-2"]);
        let e = t(3, 1).with_master_targets(0).expect_err("refused");
        assert!(e.contains("--master-targets must be at least 1"), "{e}");
    }

    fn refused(text: &str) -> String {
        Topology::parse(text, "t.toml")
            .expect_err("must be refused")
            .to_string()
    }

    #[test]
    fn bad_files_are_refused_naming_the_key() {
        let base = EXAMPLE;
        let e = refused(&base.replace("name = \"two-hosts\"", "name = \"two-hosts\"\ncolour = 1"));
        assert!(
            e.starts_with("t.toml: line ") && e.contains("colour"),
            "{e}"
        );
        let e = refused(&base.replace(
            "hosts = [{ name = \"azure-compute\"",
            "hosts = [{ name = \"sql1\"",
        ));
        assert!(
            e.contains("site[1].hosts[0].name") && e.contains("also the name"),
            "{e}"
        );
        let e = refused(&base.replace("\"64MiB\", \"32MiB\"", ""));
        assert!(
            e.contains("machines[0].disks") && e.contains("no disk"),
            "{e}"
        );
        let e = refused(&base.replace("config_server = \"cs\"\n", ""));
        assert!(
            e.contains("site[0].config_server") && e.contains("needs a configuration server"),
            "{e}"
        );
        let e = refused(&base.replace(
            "{ name = \"mt-lin\", os = \"linux\", datastores = [\"ds-b\"] }",
            "{ name = \"mt-lin\", os = \"linux\", datastores = [\"ds-a\"] }",
        ));
        assert!(
            e.contains("datastore `ds-b` of host `esx-b` is seen by no master target"),
            "{e}"
        );
        let e = refused(&base.replace(
            "os = \"linux\", disks = [\"32MiB\"]",
            "os = \"beos\", disks = [\"32MiB\"]",
        ));
        assert!(e.contains("beos"), "{e}");
    }
}
