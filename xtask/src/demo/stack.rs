//! Everything the demo runs: the hosts, the tier cgroups, the agent, `driftwatch watch` and the
//! services, torn down in the reverse order on drop.

use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::Context;
use driftwatch_e2e::{spawn_in, AgentUnderTest, Cgroup, ProcessGuard, Topology};

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

/// The cgroup the agent observes; the model's component selectors name its children.
pub const DEMO_CGROUP: &str = "/driftwatch-demo";

/// How long a service may take to print its `listening` line.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// The running demo. Fields drop in declaration order after [`Drop::drop`] has killed the
/// processes, so the agent stops before the cgroups and namespaces go.
pub struct DemoStack {
    watch: Option<WatchGuard>,
    services: Vec<(&'static str, ProcessGuard)>,
    pub agent: AgentUnderTest,
    tiers: Vec<Cgroup>,
    root: Cgroup,
    pub topology: Topology,
}

impl DemoStack {
    /// Creates the hosts and cgroups, starts the agent and `driftwatch watch`, then the services.
    ///
    /// On error, everything created so far is removed again as the locals drop.
    pub fn start(agent_bin: &Path, service_bin: &Path, model: &Path) -> anyhow::Result<DemoStack> {
        println!("creating the hosts: network namespaces joined by a router namespace");
        let mut topology = Topology::new()?;
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

        let root = Cgroup::create_replacing_stale(DEMO_CGROUP)?;
        let tiers = ["web", "api", "db"]
            .into_iter()
            .map(|tier| root.child(tier))
            .collect::<Result<Vec<_>, _>>()?;
        println!(
            "created the cgroups {DEMO_CGROUP}/{{web,api,db}} under {}",
            driftwatch_e2e::cgroup2_mount()?.display()
        );

        println!(
            "starting the agent on {} (first start loads and attaches the eBPF programs)",
            model.display()
        );
        let agent = AgentUnderTest::start_with(agent_bin, model, root.path(), &[])?;
        println!(
            "the agent is ready; its API listens on {}",
            agent.api_addr()
        );
        let watch = WatchGuard::start(agent_bin, &agent.api_arg())?;

        let mut stack = DemoStack {
            watch: Some(watch),
            services: Vec::new(),
            agent,
            tiers,
            root,
            topology,
        };
        let db = format!("{}:5432", ADDRESSES.db);
        let api = format!("{}:8081", ADDRESSES.api);
        stack.start_service(
            service_bin,
            "db",
            Some(2),
            &["db", "--listen", "0.0.0.0:5432"],
        )?;
        stack.start_service(
            service_bin,
            "api",
            Some(1),
            &["api", "--listen", "0.0.0.0:8081", "--upstream", &db],
        )?;
        stack.start_service(
            service_bin,
            "web",
            Some(0),
            &["web", "--listen", "0.0.0.0:8080", "--upstream", &api],
        )?;
        stack.start_service(
            service_bin,
            "ext",
            None,
            &["sink", "--listen", "0.0.0.0:9999"],
        )?;
        Ok(stack)
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

    /// Waits for a client run to succeed and returns its output.
    pub fn run_client(
        &self,
        mut client: ProcessGuard,
        timeout: Duration,
    ) -> anyhow::Result<Vec<String>> {
        super::interrupt::wait_until(timeout, || client.wait_exit(Duration::ZERO).ok())?
            .context("the client did not finish in time")?;
        client.wait_success(Duration::ZERO)
    }

    /// Keeps the agent's log on disk and returns its path.
    pub fn keep_agent_log(&mut self) -> PathBuf {
        self.agent.keep_logs()
    }

    /// Describes what dropping the stack removes; call it before the drop.
    pub fn cleanup_summary(&self) -> String {
        let namespaces: Vec<&str> = std::iter::once(self.topology.router().name())
            .chain(self.topology.hosts().iter().map(|host| host.netns.name()))
            .collect();
        format!(
            "cleaned up: stopped the services, `driftwatch watch` and the agent (pid {}); the kernel \
             detached the agent's eBPF programs when it exited; removed the cgroups {DEMO_CGROUP}/{{web,api,db}} \
             and the network namespaces {}",
            self.agent.pid(),
            namespaces.join(", ")
        )
    }

    pub fn services(&self) -> impl Iterator<Item = (&str, u32)> {
        self.services
            .iter()
            .map(|(name, process)| (*name, process.pid()))
    }
}

impl Drop for DemoStack {
    fn drop(&mut self) {
        self.watch.take();
        self.services.clear();
        // What the intrusion started (the listener) descends from the web service, not from us,
        // so only the cgroup still lists it.
        match self.root.kill_remaining() {
            Ok(pids) if !pids.is_empty() => {
                println!("stopped the processes left in {DEMO_CGROUP}: pids {pids:?}")
            }
            Ok(_) => {}
            Err(error) => {
                eprintln!("warning: failed to list the processes left in {DEMO_CGROUP}: {error:#}")
            }
        }
        self.agent.stop();
    }
}

/// `driftwatch watch` printing to the terminal; drop stops it by pid.
struct WatchGuard(Child);

impl WatchGuard {
    fn start(bin: &Path, api: &str) -> anyhow::Result<WatchGuard> {
        let child = Command::new(bin)
            .args(["watch", "--api", api, "--replay"])
            // Ctrl-C goes to the demo alone, which then stops this in order.
            .process_group(0)
            .spawn()
            .with_context(|| format!("failed to start {} watch", bin.display()))?;
        Ok(WatchGuard(child))
    }
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
