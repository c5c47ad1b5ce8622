//! `driftwatch-demo-service`: one small binary that plays every part of the driftwatch demo.
//!
//! The tiers speak a one-line TCP protocol: a client sends `GET <key>`, web relays it to api, api
//! relays it to db, and db replies `VALUE <key> <key reversed>`, which travels back unchanged. Each
//! request uses a fresh connection, so every hop is a connect the agent can see.
//!
//! The web tier is deliberately vulnerable: a request line `EXEC <command>` runs
//! `/bin/bash -c <command>` and returns its output followed by `EXIT <code>`. That is the simulated
//! remote code execution the demo's intrusion uses. Never run the web role outside a test network.
//!
//! Listeners print `listening <address>` on stdout once they accept connections, so whoever
//! started them can wait for that line.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::process::{Command, ExitCode, Stdio};
use std::thread;
use std::time::Duration;

mod workload;

/// Applied to every socket read and write, so a stalled peer ends one request and not the process.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

const USAGE: &str = "\
usage: driftwatch-demo-service <role> [options]
  web    --listen ADDR --upstream ADDR   serve GET (relayed upstream) and the vulnerable EXEC
  api    --listen ADDR --upstream ADDR   serve GET, relayed upstream
  db     --listen ADDR                   answer GET with VALUE
  sink   --listen ADDR [--lifetime SECS] accept connections and discard what they send
  client --target ADDR --requests N      send N GET requests and check every answer
  client --target ADDR --exec COMMAND    send one EXEC request and print its output
  connect-once --target ADDR             connect, then exit at once without sending anything
  udp-send --target ADDR [--bind ADDR] [--count N]     send N datagrams with sendto (default 1)
  udp-connect --target ADDR [--bind ADDR] [--count N]  connect a UDP socket, then send N datagrams
  udp-echo --listen ADDR                               send every datagram back to its sender
  udp-sink --listen ADDR[,ADDR...]                     read every datagram with recvfrom, answer none
  resolve-connect --server ADDR --name NAME --port N   ask a DNS server for NAME's A record, then
                                                       connect to that address over TCP
  uring-connect --target ADDR                          TCP connect through io_uring
  uring-udp --target ADDR [--bind ADDR]                one datagram through io_uring sendmsg

Every role also takes --join-cgroup DIR: move this process into the cgroup v2 directory DIR
before it starts its work, without exec.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("driftwatch-demo-service: {message}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &[String]) -> Result<ExitCode, String> {
    let Some((role, rest)) = args.split_first() else {
        return Err(format!("missing role\n{USAGE}"));
    };
    let options = Options::parse(rest)?;
    if let Some(cgroup) = &options.join_cgroup {
        let procs = std::path::Path::new(cgroup).join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string())
            .map_err(|error| format!("failed to move into cgroup {cgroup}: {error}"))?;
    }
    match role.as_str() {
        "web" => serve(&options.listen()?, Tier::Web(options.upstream()?)),
        "api" => serve(&options.listen()?, Tier::Api(options.upstream()?)),
        "db" => serve(&options.listen()?, Tier::Db),
        "sink" => {
            if let Some(seconds) = options.lifetime {
                exit_after(Duration::from_secs(seconds));
            }
            serve(&options.listen()?, Tier::Sink)
        }
        "client" => {
            let target = options.target()?;
            match (&options.exec, options.requests) {
                (Some(command), None) => send_exec(target, command),
                (None, Some(requests)) => send_requests(target, requests),
                _ => Err(format!(
                    "client needs exactly one of --requests and --exec\n{USAGE}"
                )),
            }
        }
        "connect-once" => {
            // The connection completes, then the process is gone before anyone could read
            // /proc for it: the case where attribution must come from kernel records alone.
            TcpStream::connect_timeout(&options.target()?, IO_TIMEOUT)
                .map_err(|error| format!("connect failed: {error}"))?;
            Ok(ExitCode::SUCCESS)
        }
        "udp-send" => workload::udp_send(options.target()?, options.bind()?, options.count.unwrap_or(1))
            .map(|()| ExitCode::SUCCESS),
        "udp-connect" => {
            workload::udp_connect(options.target()?, options.bind()?, options.count.unwrap_or(1))
                .map(|()| ExitCode::SUCCESS)
        }
        "udp-echo" => workload::udp_echo(options.listen()?).map(|()| ExitCode::SUCCESS),
        "udp-sink" => {
            let list = options.listen.as_deref().ok_or_else(|| format!("missing --listen ADDR\n{USAGE}"))?;
            let addrs = list
                .split(',')
                .map(|addr| resolve("--listen", Some(addr)))
                .collect::<Result<Vec<_>, _>>()?;
            workload::udp_sink(&addrs).map(|()| ExitCode::SUCCESS)
        }
        "resolve-connect" => {
            let name = options.name.as_deref().ok_or_else(|| format!("missing --name NAME\n{USAGE}"))?;
            let port = options.port.ok_or_else(|| format!("missing --port N\n{USAGE}"))?;
            workload::resolve_connect(resolve("--server", options.server.as_deref())?, name, port)
                .map(|()| ExitCode::SUCCESS)
        }
        "uring-connect" => workload::uring_connect(options.target()?).map(|()| ExitCode::SUCCESS),
        "uring-udp" => workload::uring_udp(options.target()?, options.bind()?).map(|()| ExitCode::SUCCESS),
        other => Err(format!("unknown role {other:?}\n{USAGE}")),
    }
}

#[derive(Default)]
struct Options {
    listen: Option<String>,
    upstream: Option<String>,
    target: Option<String>,
    requests: Option<u32>,
    exec: Option<String>,
    lifetime: Option<u64>,
    bind: Option<String>,
    server: Option<String>,
    name: Option<String>,
    port: Option<u16>,
    count: Option<u32>,
    join_cgroup: Option<String>,
}

impl Options {
    fn parse(args: &[String]) -> Result<Options, String> {
        let mut options = Options::default();
        let mut iter = args.iter();
        while let Some(flag) = iter.next() {
            let value = iter
                .next()
                .ok_or_else(|| format!("{flag} needs a value"))?
                .clone();
            match flag.as_str() {
                "--listen" => options.listen = Some(value),
                "--upstream" => options.upstream = Some(value),
                "--target" => options.target = Some(value),
                "--exec" => options.exec = Some(value),
                "--requests" => options.requests = Some(parse_number(flag, &value)?),
                "--lifetime" => options.lifetime = Some(parse_number(flag, &value)?),
                "--bind" => options.bind = Some(value),
                "--server" => options.server = Some(value),
                "--name" => options.name = Some(value),
                "--port" => options.port = Some(parse_number(flag, &value)?),
                "--count" => options.count = Some(parse_number(flag, &value)?),
                "--join-cgroup" => options.join_cgroup = Some(value),
                _ => return Err(format!("unknown option {flag:?}\n{USAGE}")),
            }
        }
        Ok(options)
    }

    fn listen(&self) -> Result<SocketAddr, String> {
        resolve("--listen", self.listen.as_deref())
    }

    fn upstream(&self) -> Result<SocketAddr, String> {
        resolve("--upstream", self.upstream.as_deref())
    }

    fn target(&self) -> Result<SocketAddr, String> {
        resolve("--target", self.target.as_deref())
    }

    fn bind(&self) -> Result<Option<SocketAddr>, String> {
        self.bind.as_deref().map(|bind| resolve("--bind", Some(bind))).transpose()
    }
}

fn parse_number<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("{flag} expects a number, got {value:?}"))
}

fn resolve(flag: &str, value: Option<&str>) -> Result<SocketAddr, String> {
    let value = value.ok_or_else(|| format!("missing {flag} ADDR"))?;
    value
        .to_socket_addrs()
        .map_err(|error| format!("invalid address {value:?} for {flag}: {error}"))?
        .next()
        .ok_or_else(|| format!("address {value:?} for {flag} resolves to nothing"))
}

#[derive(Clone, Copy)]
enum Tier {
    Web(SocketAddr),
    Api(SocketAddr),
    Db,
    Sink,
}

fn serve(listen: &SocketAddr, tier: Tier) -> Result<ExitCode, String> {
    let listener = TcpListener::bind(listen)
        .map_err(|error| format!("failed to listen on {listen}: {error}"))?;
    let local = listener.local_addr().map_err(|error| error.to_string())?;
    println!("listening {local}");
    io::stdout().flush().map_err(|error| error.to_string())?;

    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                thread::spawn(move || {
                    if let Err(error) = handle(stream, tier) {
                        eprintln!("driftwatch-demo-service: request failed: {error}");
                    }
                });
            }
            Err(error) => eprintln!("driftwatch-demo-service: accept failed: {error}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn handle(stream: TcpStream, tier: Tier) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;

    if let Tier::Sink = tier {
        // Drain until the peer closes; what it sent does not matter.
        return io::copy(&mut reader, &mut io::sink()).map(|_| ());
    }

    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        // The peer closed without a request, as `connect-once` does.
        return Ok(());
    }
    let line = line.trim_end();
    let reply = match (tier, line.split_once(' ')) {
        (Tier::Web(_), Some(("EXEC", command))) => run_shell(command),
        (Tier::Web(upstream) | Tier::Api(upstream), Some(("GET", _))) => relay(upstream, line)?,
        (Tier::Db, Some(("GET", key))) => format!("VALUE {key} {}", reverse(key)),
        _ => format!("ERROR unsupported request {line:?}"),
    };
    writeln!(writer, "{reply}")
}

fn relay(upstream: SocketAddr, request: &str) -> io::Result<String> {
    let stream = TcpStream::connect_timeout(&upstream, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    request_line(stream, request)
}

/// Sends one request line on `stream` and returns the first reply line, without its newline.
fn request_line(mut stream: TcpStream, request: &str) -> io::Result<String> {
    writeln!(stream, "{request}")?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    Ok(answer.trim_end().to_string())
}

fn run_shell(command: &str) -> String {
    // Output is collected until bash and every child still holding its stdout exit, so a command
    // that starts a background job must redirect that job's output.
    match Command::new("/bin/bash")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .output()
    {
        Ok(output) => {
            let mut reply = String::from_utf8_lossy(&output.stdout).into_owned();
            reply.push_str(&String::from_utf8_lossy(&output.stderr));
            let code = output.status.code().unwrap_or(-1);
            format!("{reply}EXIT {code}")
        }
        Err(error) => format!("ERROR failed to run /bin/bash: {error}\nEXIT -1"),
    }
}

fn reverse(key: &str) -> String {
    key.chars().rev().collect()
}

fn send_requests(target: SocketAddr, requests: u32) -> Result<ExitCode, String> {
    let mut correct = 0;
    for index in 0..requests {
        let key = format!("item{index}");
        let expected = format!("VALUE {key} {}", reverse(&key));
        let stream = TcpStream::connect_timeout(&target, IO_TIMEOUT)
            .map_err(|error| format!("failed to connect to {target}: {error}"))?;
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .map_err(|error| error.to_string())?;
        let answer = request_line(stream, &format!("GET {key}"))
            .map_err(|error| format!("request {index} to {target} failed: {error}"))?;
        if answer == expected {
            correct += 1;
        } else {
            eprintln!("request {index}: expected {expected:?}, got {answer:?}");
        }
    }
    println!("client: {correct}/{requests} answers correct");
    Ok(if correct == requests {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn send_exec(target: SocketAddr, command: &str) -> Result<ExitCode, String> {
    let mut stream = TcpStream::connect_timeout(&target, IO_TIMEOUT)
        .map_err(|error| format!("failed to connect to {target}: {error}"))?;
    // The command may wait on its own connections, so allow it more than one socket timeout.
    stream
        .set_read_timeout(Some(IO_TIMEOUT * 4))
        .map_err(|error| error.to_string())?;
    writeln!(stream, "EXEC {command}").map_err(|error| error.to_string())?;

    for line in BufReader::new(stream).lines() {
        let line = line.map_err(|error| format!("reading the EXEC output failed: {error}"))?;
        if let Some(code) = line.strip_prefix("EXIT ") {
            return Ok(if code == "0" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        println!("{line}");
    }
    Err("the connection closed before the EXIT line".to_string())
}

fn exit_after(lifetime: Duration) {
    thread::spawn(move || {
        thread::sleep(lifetime);
        std::process::exit(0);
    });
}
