//! A node killed in the middle of a federation, even in the middle of writing its
//! checkpoint: the others keep their round deadline and finish, and the killed node,
//! restarted, resumes from its last complete checkpoint.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{dfl_node, plan_in, Federation};
use edgesync_node::federation::report::NodeEvent;

fn start(config: &std::path::Path, events: mpsc::Sender<NodeEvent>) -> Child {
    start_injecting(config, events, "")
}

/// Starts `dfl-node run` injecting `faults` into itself; its events go to `events`.
fn start_injecting(
    config: &std::path::Path,
    events: mpsc::Sender<NodeEvent>,
    faults: &str,
) -> Child {
    let log = std::fs::File::create(config.with_file_name("test.log")).unwrap();
    let mut child = Command::new(dfl_node())
        .arg("run")
        .arg("--config")
        .arg(config)
        .env("EDGESYNC_INJECT_FAULTS", faults)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(event) = serde_json::from_str::<NodeEvent>(&line) {
                if events.send(event).is_err() {
                    break;
                }
            }
        }
    });
    child
}

fn wait(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let until = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < until, "node did not finish in {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn killed_node_does_not_stall_the_others_and_resumes_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let deadline = 3.0;
    let rounds = 12;
    let manifest = Federation {
        name: "faults",
        rounds,
        local_steps: 10,
        deadline_seconds: deadline,
        eval_every: 6,
        ..Default::default()
    }
    .write(dir.path());
    let plan = plan_in(manifest, dir.path());

    let (tx, rx) = mpsc::channel();
    let mut children: Vec<(String, Child)> = plan
        .configs
        .iter()
        .map(|(name, path)| (name.clone(), start(path, tx.clone())))
        .collect();
    let victim = "node-2".to_string();

    // Kill the victim with SIGKILL as soon as it has finished round 3.
    let mut seen = Vec::new();
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let event = rx
            .recv_timeout(until - Instant::now())
            .expect("no progress from nodes");
        let done = matches!(&event, NodeEvent::Round(r) if r.node == victim && r.round == 3);
        seen.push(event);
        if done {
            break;
        }
    }
    let killed_at = Instant::now();
    children
        .iter_mut()
        .find(|(n, _)| *n == victim)
        .unwrap()
        .1
        .kill()
        .unwrap();

    // Restart it from the same configuration: it must pick up after round 3.
    std::thread::sleep(Duration::from_millis(500));
    let mut restarted = start(&plan.configs[&victim], tx.clone());
    drop(tx);

    for (name, child) in children.iter_mut().filter(|(n, _)| *n != victim) {
        let status = wait(child, Duration::from_secs(180));
        assert!(status.success(), "{name} failed");
    }
    assert!(wait(&mut restarted, Duration::from_secs(180)).success());
    seen.extend(rx.try_iter());

    for survivor in ["node-0", "node-1"] {
        let rows: Vec<_> = seen
            .iter()
            .filter_map(|e| match e {
                NodeEvent::Round(r) if r.node == survivor => Some(r),
                _ => None,
            })
            .collect();
        assert_eq!(
            rows.len() as u64,
            rounds,
            "{survivor} completed every round"
        );
        // Waiting never exceeds the deadline (plus scheduling slack) even while a
        // neighbour is dead.
        for r in &rows {
            assert!(
                r.waiting_seconds < deadline + 1.5,
                "{survivor} waited {:.1}s in round {}",
                r.waiting_seconds,
                r.round
            );
        }
    }
    assert!(killed_at.elapsed() < Duration::from_secs(170));

    let restarts: Vec<u64> = seen
        .iter()
        .filter_map(|e| match e {
            NodeEvent::Started { node, round, .. } if *node == victim => Some(*round),
            _ => None,
        })
        .collect();
    assert_eq!(restarts.len(), 2, "the victim started twice");
    assert_eq!(restarts[0], 1);
    assert!(
        restarts[1] >= 4,
        "restarted node began at round {}",
        restarts[1]
    );
    let victim_rounds: Vec<u64> = seen
        .iter()
        .filter_map(|e| match e {
            NodeEvent::Round(r) if r.node == victim => Some(r.round),
            _ => None,
        })
        .collect();
    assert_eq!(
        victim_rounds.last(),
        Some(&rounds),
        "restarted node reached the last round"
    );
}

/// The rounds `node` reported, in order.
fn rounds_of(events: &[NodeEvent], node: &str) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            NodeEvent::Round(r) if r.node == node => Some(r.round),
            _ => None,
        })
        .collect()
}

#[test]
fn a_checkpoint_write_killed_halfway_leaves_the_previous_one_valid() {
    let dir = tempfile::tempdir().unwrap();
    let rounds = 8;
    let manifest = Federation {
        name: "torn",
        rounds,
        local_steps: 10,
        deadline_seconds: 3.0,
        eval_every: 4,
        ..Default::default()
    }
    .write(dir.path());
    let plan = plan_in(manifest, dir.path());
    let victim = "node-1";
    let state = dir.path().join("run/nodes").join(victim);
    let checkpoint = state.join(format!("{victim}.safetensors"));
    let partial = state.join(format!("{victim}.safetensors.tmp"));

    // Every checkpoint write of the victim pauses halfway for 4 s: the first completes,
    // the second is where it dies.
    let (tx, rx) = mpsc::channel();
    let mut children: Vec<(String, Child)> = plan
        .configs
        .iter()
        .map(|(name, path)| {
            let faults = if name == victim {
                "checkpoint-stall-ms=4000"
            } else {
                ""
            };
            (name.clone(), start_injecting(path, tx.clone(), faults))
        })
        .collect();
    let until = Instant::now() + Duration::from_secs(120);
    while !checkpoint.exists() {
        assert!(
            Instant::now() < until,
            "the victim never wrote a checkpoint"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    while !partial.metadata().is_ok_and(|m| m.len() > 0) {
        assert!(
            Instant::now() < until,
            "the victim never began a second checkpoint"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let victim_child = &mut children.iter_mut().find(|(n, _)| n == victim).unwrap().1;
    victim_child.kill().unwrap();
    victim_child.wait().unwrap();

    // What the crash left: a torn temporary file, and the previous checkpoint intact.
    let torn = std::fs::read(&partial).unwrap();
    let complete = std::fs::read(&checkpoint).unwrap();
    assert!(!torn.is_empty() && torn.len() < complete.len() * 3 / 4);
    assert!(edgesync_node::checkpoint::load(&partial).is_err());
    let saved: u64 = edgesync_node::checkpoint::load(&checkpoint)
        .expect("the previous checkpoint is still valid")
        .field("round")
        .unwrap();
    let before: Vec<NodeEvent> = rx.try_iter().collect();
    assert_eq!(
        rounds_of(&before, victim).last(),
        Some(&saved),
        "the valid checkpoint holds the last round the victim finished"
    );

    let mut restarted = start(&plan.configs[victim], tx.clone());
    drop(tx);
    for (name, child) in children.iter_mut().filter(|(n, _)| n != victim) {
        assert!(
            wait(child, Duration::from_secs(180)).success(),
            "{name} failed"
        );
    }
    assert!(wait(&mut restarted, Duration::from_secs(180)).success());
    let after: Vec<NodeEvent> = rx.try_iter().collect();
    let resumed_at = after
        .iter()
        .find_map(|e| match e {
            NodeEvent::Started { node, round, .. } if node == victim => Some(*round),
            _ => None,
        })
        .unwrap();
    assert!(
        resumed_at > saved,
        "resumed at round {resumed_at} from {saved}"
    );
    assert_eq!(rounds_of(&after, victim).last(), Some(&rounds));
    for survivor in ["node-0", "node-2"] {
        let all: Vec<u64> = rounds_of(&before, survivor)
            .into_iter()
            .chain(rounds_of(&after, survivor))
            .collect();
        assert_eq!(all, (1..=rounds).collect::<Vec<_>>(), "{survivor}");
    }
}

#[test]
fn interrupting_the_launcher_stops_every_node_cleanly() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;

    let dir = tempfile::tempdir().unwrap();
    let manifest = Federation {
        name: "interrupt",
        rounds: 200,
        local_steps: 5,
        ..Default::default()
    }
    .write(dir.path());
    let report_dir = dir.path().join("run");
    let mut launcher = Command::new(dfl_node())
        .args(["local", "-f"])
        .arg(&manifest)
        .arg("--report-dir")
        .arg(&report_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Without a terminal the launcher prints one line per node and round.
    let stdout = launcher.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines().map_while(Result::ok);
    lines
        .find(|l| l.contains("round    3/"))
        .expect("no progress before the interrupt");
    kill(Pid::from_raw(launcher.id() as i32), Signal::SIGINT).unwrap();
    std::thread::spawn(move || lines.for_each(drop));

    let status = wait(&mut launcher, Duration::from_secs(60));
    assert!(status.success(), "launcher exited with {status}");
    let report = std::fs::read_to_string(report_dir.join("report.json")).unwrap();
    assert!(report.contains("\"exited\""));
    for node in ["node-0", "node-1", "node-2"] {
        let path = report_dir
            .join("nodes")
            .join(node)
            .join(format!("{node}.safetensors"));
        let checkpoint = edgesync_node::checkpoint::load(&path).unwrap();
        let round: u64 = checkpoint.field("round").unwrap();
        assert!((3..200).contains(&round), "{node} stopped at round {round}");
    }
}
