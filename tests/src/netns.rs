//! Network namespaces as test hosts, joined through a bridge in a router namespace.
//!
//! The root namespace's interfaces, routes and sysctls are never touched: every veth pair has both
//! ends in namespaces created here, and the router's forwarding is switched on inside its own
//! namespace only.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::{unique_suffix, Result};

/// A named network namespace (`ip netns add`), deleted on drop.
///
/// Deleting the name does not end processes inside; the namespace itself lives until the last of
/// them exits, so drop their [`crate::ProcessGuard`]s first.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace and brings its loopback interface up.
    pub fn create(name: &str) -> Result<NetNs> {
        run_ip(&["netns", "add", name])?;
        let netns = NetNs {
            name: name.to_string(),
        };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind mount that `setns` opens to enter the namespace.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `ip -n <name> <args>` and fails with its stderr when it fails.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run_ip(&full)
    }

    /// Sets a sysctl inside this namespace only, such as `net.ipv4.ip_forward=1`.
    pub fn sysctl(&self, assignment: &str) -> Result<()> {
        run(Command::new("ip").args([
            "netns", "exec", &self.name, "sysctl", "-q", "-w", assignment,
        ]))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(error) = run_ip(&["netns", "delete", &self.name]) {
            eprintln!(
                "warning: failed to delete network namespace {}: {error:#}",
                self.name
            );
        }
    }
}

/// One test host: a namespace with an `eth0` on the router's bridge.
#[derive(Debug)]
pub struct Host {
    pub name: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub netns: NetNs,
}

/// Hosts in their own namespaces, connected through a bridge in a dedicated router namespace.
///
/// Each host subnet gets its first address as a gateway on the router's bridge, and the router
/// forwards between subnets, so hosts in different subnets reach each other through it.
/// Use the benchmarking range 198.18.0.0/15 (RFC 2544) and IPv6 unique local addresses (fd00::/8),
/// which no real network routes to.
#[derive(Debug)]
pub struct Topology {
    prefix: String,
    // Hosts are dropped before the router, so no veth end outlives its bridge by surprise.
    hosts: Vec<Host>,
    router: NetNs,
    gateways: BTreeSet<IpNet>,
}

const BRIDGE: &str = "br0";

impl Topology {
    /// Creates the router namespace and its bridge; names start with `dw` and a unique suffix.
    pub fn new() -> Result<Topology> {
        Topology::tagged("")
    }

    /// Like [`Topology::new`], with `tag` between `dw` and the suffix, so a reader of `ip netns`
    /// can tell who created a namespace.
    pub fn tagged(tag: &str) -> Result<Topology> {
        let prefix = format!("dw{tag}{}", unique_suffix());
        let router = NetNs::create(&format!("{prefix}-rt"))?;
        router.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        router.ip(&["link", "set", BRIDGE, "up"])?;
        router.sysctl("net.ipv4.ip_forward=1")?;
        router.sysctl("net.ipv6.conf.all.forwarding=1")?;
        // Hosts in different subnets share the bridge, so the router would otherwise tell them
        // to talk directly; the tests want every hop through it.
        router.sysctl("net.ipv4.conf.all.send_redirects=0")?;
        Ok(Topology {
            prefix,
            hosts: Vec::new(),
            router,
            gateways: BTreeSet::new(),
        })
    }

    /// The name prefix shared by every namespace of this topology.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn router(&self) -> &NetNs {
        &self.router
    }

    /// Adds a host with the given addresses in CIDR form, such as `198.18.2.10/24` and
    /// `fd00:d5:2::10/64`, and a default route through its subnet's gateway on the router.
    pub fn add_host(&mut self, name: &str, ipv4: &str, ipv6: &str) -> Result<&Host> {
        let v4: Ipv4Net = ipv4
            .parse()
            .with_context(|| format!("invalid IPv4 CIDR {ipv4:?}"))?;
        let v6: Ipv6Net = ipv6
            .parse()
            .with_context(|| format!("invalid IPv6 CIDR {ipv6:?}"))?;
        if self.hosts.iter().any(|host| host.name == name) {
            bail!("host {name:?} already exists in topology {}", self.prefix);
        }
        let gateway4 = self.ensure_gateway(IpNet::V4(v4.trunc()))?;
        let gateway6 = self.ensure_gateway(IpNet::V6(v6.trunc()))?;
        if IpAddr::V4(v4.addr()) == gateway4 || IpAddr::V6(v6.addr()) == gateway6 {
            bail!("host {name:?} cannot use its subnet's first address, the router has it");
        }

        let netns_name = truncate(&format!("{}-{name}", self.prefix), 15);
        let netns = NetNs::create(&netns_name)?;
        let router_end = format!("v{}", self.hosts.len());
        // Both ends are created in the router namespace, then one moves into the host, so the
        // root namespace never contains either.
        self.router.ip(&[
            "link",
            "add",
            &router_end,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns_name,
        ])?;
        self.router
            .ip(&["link", "set", &router_end, "master", BRIDGE, "up"])?;

        let v4_cidr = v4.to_string();
        let v6_cidr = v6.to_string();
        netns.ip(&["addr", "add", &v4_cidr, "dev", "eth0"])?;
        // nodad: the address is usable at once instead of after duplicate address detection.
        netns.ip(&["-6", "addr", "add", &v6_cidr, "dev", "eth0", "nodad"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        netns.ip(&["route", "add", "default", "via", &gateway4.to_string()])?;
        netns.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &gateway6.to_string(),
        ])?;

        self.hosts.push(Host {
            name: name.to_string(),
            ipv4: v4.addr(),
            ipv6: v6.addr(),
            netns,
        });
        Ok(self.hosts.last().expect("a host was just pushed"))
    }

    /// Returns the host added under `name`; panics when there is none, which is a test bug.
    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|host| host.name == name)
            .unwrap_or_else(|| panic!("no host {name:?} in topology {}", self.prefix))
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    fn ensure_gateway(&mut self, subnet: IpNet) -> Result<IpAddr> {
        let gateway = subnet
            .hosts()
            .next()
            .with_context(|| format!("subnet {subnet} has no hosts"))?;
        if self.gateways.insert(subnet) {
            let cidr = format!("{gateway}/{}", subnet.prefix_len());
            match subnet {
                IpNet::V4(_) => self.router.ip(&["addr", "add", &cidr, "dev", BRIDGE])?,
                IpNet::V6(_) => self
                    .router
                    .ip(&["-6", "addr", "add", &cidr, "dev", BRIDGE, "nodad"])?,
            }
        }
        Ok(gateway)
    }
}

fn truncate(name: &str, max: usize) -> String {
    name.chars().take(max).collect()
}

fn run_ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args))
}

fn run(command: &mut Command) -> Result<()> {
    let output = command
        .output()
        .with_context(|| format!("failed to run {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}
