//! `dfl-node local`: a whole federation on one machine, one OS process per node.
//!
//! The launcher reads the same manifest a cluster would take, gives every node an Ed25519
//! identity, a loopback port and a metrics port, writes each node's configuration, starts
//! `dfl-node run` for each, shows their progress live and gathers the report. Nodes talk to
//! each other over real libp2p connections on 127.0.0.1, exactly as pods would across
//! hosts; `metrics.txt` in the report folder lists each node's Prometheus scrape URL.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use edgesync_api::{DatasetFormat, DflNode, Manifest};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use kube::ResourceExt;
use libp2p::identity;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use super::config::{self, MemberConfig, MemberModel, NodeConfig};
use super::report::{NodeEvent, Report};

/// How long nodes get to stop after Ctrl-C before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(20);

pub struct LocalOptions {
    pub manifest: PathBuf,
    pub report_dir: Option<PathBuf>,
    pub resume: bool,
    pub threads_per_node: Option<usize>,
}

/// A federation ready to start: identities and node configurations written.
pub struct Plan {
    pub federation: String,
    pub rounds: u64,
    pub report_dir: PathBuf,
    /// Each node's configuration file, by node name.
    pub configs: BTreeMap<String, PathBuf>,
    /// Each node's Prometheus scrape URL, by node name; also listed in `metrics.txt`.
    pub metrics: BTreeMap<String, String>,
}

/// Reads and validates the manifest, and writes every node's identity and configuration
/// into the report folder, without starting anything.
pub fn plan(options: &LocalOptions) -> anyhow::Result<Plan> {
    let text = std::fs::read_to_string(&options.manifest)
        .with_context(|| format!("reading manifest {}", options.manifest.display()))?;
    let manifest = Manifest::parse(&text)
        .with_context(|| format!("manifest {}", options.manifest.display()))?;
    let base = options
        .manifest
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let federation = manifest.federation.name_any();
    let report_dir = options
        .report_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(&federation));
    prepare_report_dir(&report_dir, options.resume)?;
    let (configs, metrics) = node_configs(&manifest, &base, &report_dir, options.threads_per_node)?;
    // Written before any node starts, so whoever watches the run can point a scraper at
    // the nodes while they train.
    let listing: String = metrics
        .iter()
        .map(|(node, url)| format!("{node} {url}\n"))
        .collect();
    let path = report_dir.join("metrics.txt");
    std::fs::write(&path, listing).with_context(|| format!("writing {}", path.display()))?;
    Ok(Plan {
        federation,
        rounds: manifest.federation.spec.rounds,
        report_dir,
        configs,
        metrics,
    })
}

/// Runs the federation in `options.manifest` to completion (or Ctrl-C) and writes its
/// report. Returns the report directory.
pub async fn run(options: LocalOptions) -> anyhow::Result<PathBuf> {
    let Plan {
        federation,
        rounds,
        report_dir,
        configs,
        metrics,
    } = plan(&options)?;
    for (node, url) in &metrics {
        tracing::info!(%node, %url, "node metrics");
    }
    let exe = std::env::current_exe().context("locating the dfl-node executable")?;
    let (tx, mut rx) = mpsc::channel::<NodeEvent>(1024);
    let mut children: BTreeMap<String, Child> = BTreeMap::new();
    let mut pids = Vec::new();
    for (name, path) in &configs {
        let child = spawn_node(&exe, name, path, &report_dir, tx.clone())?;
        pids.extend(child.id());
        children.insert(name.clone(), child);
    }
    drop(tx);

    let view = LiveView::new(&configs.keys().cloned().collect::<Vec<_>>(), rounds);
    let mut report = Report {
        federation: federation.clone(),
        ..Report::default()
    };
    let mut waits = tokio::task::JoinSet::new();
    for (name, mut child) in children {
        waits.spawn(async move { (name, child.wait().await.ok().and_then(|s| s.code())) });
    }

    let mut interrupted = false;
    let mut failures = Vec::new();
    let grace = tokio::time::sleep(Duration::MAX / 4);
    tokio::pin!(grace);
    loop {
        tokio::select! {
            Some(event) = rx.recv() => {
                view.show(&event);
                report.record(event);
            }
            Some(done) = waits.join_next() => {
                let Ok((node, code)) = done else { continue };
                if code != Some(0) && !interrupted {
                    failures.push(format!("{node} exited with {code:?}"));
                }
                report.record(NodeEvent::Exited { node, code });
                if waits.is_empty() {
                    // Drain what the last nodes printed before they exited.
                    while let Ok(event) = rx.try_recv() {
                        report.record(event);
                    }
                    break;
                }
            }
            _ = tokio::signal::ctrl_c(), if !interrupted => {
                interrupted = true;
                view.note("stopping: every node finishes its current round and checkpoints");
                stop_nodes(&pids);
                grace.as_mut().reset(tokio::time::Instant::now() + STOP_GRACE);
            }
            _ = &mut grace => {
                view.note("nodes did not stop in time: killing them");
                // Dropping the wait tasks drops the children, which kills them.
                waits.abort_all();
                break;
            }
        }
    }
    view.finish();
    report.write(&report_dir)?;
    print_summary(&report, &configs.keys().cloned().collect::<Vec<_>>());
    println!("report written to {}", report_dir.display());
    if !failures.is_empty() {
        bail!(
            "{}; logs are in {}",
            failures.join(", "),
            report_dir.join("nodes").display()
        );
    }
    Ok(report_dir)
}

fn prepare_report_dir(dir: &Path, resume: bool) -> anyhow::Result<()> {
    let nodes = dir.join("nodes");
    let has_checkpoints = std::fs::read_dir(&nodes)
        .map(|entries| {
            entries.filter_map(|e| e.ok()).any(|e| {
                std::fs::read_dir(e.path()).is_ok_and(|mut files| {
                    files.any(|f| {
                        f.is_ok_and(|f| f.path().extension().is_some_and(|x| x == "safetensors"))
                    })
                })
            })
        })
        .unwrap_or(false);
    if has_checkpoints && !resume {
        bail!(
            "{} holds checkpoints of an earlier run: pass --resume to continue it, or choose \
             another --report-dir",
            dir.display()
        );
    }
    std::fs::create_dir_all(&nodes).with_context(|| format!("creating {}", nodes.display()))?;
    Ok(())
}

/// Writes every node's identity and configuration; returns config paths and metrics URLs
/// by node name.
fn node_configs(
    manifest: &Manifest,
    base: &Path,
    report_dir: &Path,
    threads: Option<usize>,
) -> anyhow::Result<(BTreeMap<String, PathBuf>, BTreeMap<String, String>)> {
    struct Planned {
        node: DflNode,
        dir: PathBuf,
        key_file: PathBuf,
        peer_id: String,
        port: u16,
        metrics: SocketAddr,
        model: MemberModel,
    }
    let mut planned = Vec::new();
    for node in &manifest.nodes {
        let name = node.name_any();
        let mut node = node.clone();
        let path = base.join(&node.spec.dataset.path);
        let path = path.canonicalize().with_context(|| {
            format!(
                "DflNode {name}: spec.dataset.path {} does not exist",
                path.display()
            )
        })?;
        node.spec.dataset.path = path.display().to_string();

        let dir = report_dir.join("nodes").join(&name);
        std::fs::create_dir_all(&dir)?;
        let key_file = dir.join("identity.key");
        let keypair = load_or_create_key(&key_file)?;
        let classes = class_count(&node)?;
        planned.push(Planned {
            model: MemberModel::of(&node.spec, classes),
            peer_id: keypair.public().to_peer_id().to_string(),
            port: free_port()?,
            metrics: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)),
            node,
            dir,
            key_file,
        });
    }

    let mut out = BTreeMap::new();
    let mut urls = BTreeMap::new();
    for me in &planned {
        let name = me.node.name_any();
        let neighbours = &manifest.neighbours[&name];
        let members = planned
            .iter()
            .map(|p| MemberConfig {
                name: p.node.name_any(),
                peer_id: p.peer_id.clone(),
                addresses: vec![format!("/ip4/127.0.0.1/tcp/{}", p.port)],
                model: p.model,
                dataset_key: config::dataset_key(&p.node.spec),
                neighbour: neighbours.contains(&p.node.name_any()),
            })
            .collect();
        let config = NodeConfig {
            federation: manifest.federation.name_any(),
            name: name.clone(),
            federation_spec: manifest.federation.spec.clone(),
            node_spec: me.node.spec.clone(),
            key_file: me.key_file.clone(),
            listen: format!("/ip4/127.0.0.1/tcp/{}", me.port),
            members,
            state_dir: me.dir.clone(),
            threads,
            metrics_address: Some(me.metrics),
        };
        let path = me.dir.join("config.yaml");
        std::fs::write(&path, serde_yaml::to_string(&config)?)
            .with_context(|| format!("writing {}", path.display()))?;
        urls.insert(name.clone(), format!("http://{}/metrics", me.metrics));
        out.insert(name, path);
    }
    Ok((out, urls))
}

/// A node keeps its identity across resumed runs, so its peers' estimates stay valid.
fn load_or_create_key(path: &Path) -> anyhow::Result<identity::Keypair> {
    if let Ok(bytes) = std::fs::read(path) {
        return identity::Keypair::from_protobuf_encoding(&bytes)
            .with_context(|| format!("identity key {} is not valid", path.display()));
    }
    let keypair = identity::Keypair::generate_ed25519();
    let bytes = keypair
        .to_protobuf_encoding()
        .context("encoding identity key")?;
    write_private(path, &bytes)?;
    Ok(keypair)
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes)?;
    Ok(())
}

fn class_count(node: &DflNode) -> anyhow::Result<i64> {
    if node.spec.dataset.format != DatasetFormat::ImageFolder {
        return Ok(10);
    }
    let train = Path::new(&node.spec.dataset.path).join("train");
    let count = std::fs::read_dir(&train)
        .with_context(|| format!("DflNode {}: reading {}", node.name_any(), train.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .count();
    Ok(count as i64)
}

/// A port the OS says is free now. Another process could take it before the node binds
/// it; the node then fails to start with an error naming the address.
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

fn spawn_node(
    exe: &Path,
    name: &str,
    config: &Path,
    report_dir: &Path,
    events: mpsc::Sender<NodeEvent>,
) -> anyhow::Result<Child> {
    let log_path = report_dir.join("nodes").join(name).join("node.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let mut child = Command::new(exe)
        .arg("run")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting node {name}"))?;
    let stdout = child.stdout.take().context("node stdout")?;
    let name = name.to_string();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            match serde_json::from_str::<NodeEvent>(&line) {
                Ok(event) => {
                    if events.send(event).await.is_err() {
                        break;
                    }
                }
                Err(_) => tracing::debug!(node = %name, %line, "unrecognised output"),
            }
        }
    });
    Ok(child)
}

/// Asks every node to stop (SIGTERM); each finishes its current round and leaves its last
/// checkpoint intact.
fn stop_nodes(pids: &[u32]) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    for &pid in pids {
        // A node that already exited has nothing to stop.
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    }
}

/// One line per node on a terminal; plain lines otherwise.
struct LiveView {
    bars: Option<(MultiProgress, BTreeMap<String, ProgressBar>)>,
    rounds: u64,
}

impl LiveView {
    fn new(nodes: &[String], rounds: u64) -> LiveView {
        if !std::io::stderr().is_terminal() {
            return LiveView { bars: None, rounds };
        }
        let multi = MultiProgress::new();
        let style = ProgressStyle::with_template("{prefix:>12} {bar:30} {pos:>4}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        let bars = nodes
            .iter()
            .map(|n| {
                let bar = multi.add(ProgressBar::new(rounds));
                bar.set_style(style.clone());
                bar.set_prefix(n.clone());
                bar.set_message("starting");
                (n.clone(), bar)
            })
            .collect();
        LiveView {
            bars: Some((multi, bars)),
            rounds,
        }
    }

    fn show(&self, event: &NodeEvent) {
        let NodeEvent::Round(r) = event else { return };
        let acc = r
            .test_accuracy
            .map_or("      -".into(), |a| format!("{:6.2}%", a * 100.0));
        let msg = format!(
            "loss {:.4}  acc {acc}  peers {}  {:.1}s",
            r.train_loss, r.peers_connected, r.round_seconds
        );
        match &self.bars {
            Some((_, bars)) => {
                if let Some(bar) = bars.get(&r.node) {
                    bar.set_position(r.round);
                    bar.set_message(msg);
                }
            }
            None => println!("{:>12} round {:>4}/{}  {msg}", r.node, r.round, self.rounds),
        }
    }

    fn note(&self, text: &str) {
        match &self.bars {
            Some((multi, _)) => {
                let _ = multi.println(text);
            }
            None => println!("{text}"),
        }
    }

    fn finish(&self) {
        if let Some((_, bars)) = &self.bars {
            for bar in bars.values() {
                bar.finish();
            }
        }
    }
}

fn print_summary(report: &Report, nodes: &[String]) {
    println!(
        "{:>12} {:>6} {:>9} {:>10} {:>12}",
        "node", "round", "accuracy", "loss", "MB sent"
    );
    for node in nodes {
        let rows: Vec<_> = report.rounds.iter().filter(|r| &r.node == node).collect();
        let Some(last) = rows.last() else {
            println!("{node:>12}  no rounds completed");
            continue;
        };
        let acc = rows
            .iter()
            .rev()
            .find_map(|r| r.test_accuracy)
            .map_or("-".into(), |a| format!("{:.2}%", a * 100.0));
        let sent: u64 = rows.iter().map(|r| r.bytes_sent).sum();
        println!(
            "{node:>12} {:>6} {acc:>9} {:>10.4} {:>12.2}",
            last.round,
            last.train_loss,
            sent as f64 / 1e6
        );
    }
}
