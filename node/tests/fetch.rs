//! `data fetch` against a local HTTP server the tests start themselves, so they run offline
//! and in seconds: fresh and resumed downloads, checksum and HTTP failures, timeouts and
//! unpacking of the CIFAR-10 archive.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use edgesync_node::data::fetch::{self, Downloaded, FetchDataset, FetchError, Fetcher, RemoteFile};
use flate2::write::GzEncoder;
use sha2::{Digest, Sha256};

/// How the test server answers.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Honour `Range: bytes=N-` with 206 (or 416 past the end).
    Ranges,
    /// Ignore ranges and always send the whole file with 200.
    IgnoreRanges,
    /// Announce the whole file but close the connection after half of it.
    CutHalfway,
    /// Read the request and never answer.
    Silent,
}

/// One request the server saw.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    range: Option<String>,
}

struct Server {
    base: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Server {
    fn start(files: &[(&str, Vec<u8>)], mode: Mode) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let files: Arc<HashMap<String, Vec<u8>>> = Arc::new(
            files
                .iter()
                .map(|(p, d)| (p.to_string(), d.clone()))
                .collect(),
        );
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (files, log) = (files.clone(), log.clone());
                thread::spawn(move || handle(stream, &files, &log, mode));
            }
        });
        Server { base, seen }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn handle(
    mut stream: TcpStream,
    files: &HashMap<String, Vec<u8>>,
    log: &Mutex<Vec<Seen>>,
    mode: Mode,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    reader.read_line(&mut request_line).unwrap();
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_string();
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("range") {
                range = Some(value.trim().to_string());
            }
        }
    }
    log.lock().unwrap().push(Seen {
        path: path.clone(),
        range: range.clone(),
    });
    if mode == Mode::Silent {
        thread::sleep(Duration::from_secs(10));
        return;
    }
    let Some(data) = files.get(&path) else {
        let _ = write!(
            stream,
            "HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found"
        );
        return;
    };
    let len = data.len();
    let from = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok());
    let response = match from {
        Some(from) if mode == Mode::Ranges && from >= len => {
            let head = format!(
                "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\n\
                 Content-Length: 0\r\nConnection: close\r\n\r\n"
            );
            head.into_bytes()
        }
        Some(from) if mode == Mode::Ranges => {
            let mut head = format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {from}-{}/{len}\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n",
                len - 1,
                len - from
            )
            .into_bytes();
            head.extend_from_slice(&data[from..]);
            head
        }
        _ => {
            let mut head =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
                    .into_bytes();
            let body = if mode == Mode::CutHalfway {
                &data[..len / 2]
            } else {
                &data[..]
            };
            head.extend_from_slice(body);
            head
        }
    };
    let _ = stream.write_all(&response);
    let _ = stream.flush();
}

/// Bytes that differ at every offset, so a misplaced resume shows in the checksum.
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn fetcher() -> Fetcher {
    Fetcher::new(Duration::from_secs(5), Duration::from_secs(5))
}

fn remote(server: &Server, name: &str, data: &[u8]) -> RemoteFile {
    RemoteFile {
        name: name.to_string(),
        url: server.url(&format!("/{name}")),
        sha256: sha256(data),
    }
}

/// A gzip-compressed tar archive holding `entries` as regular files. Names are written into
/// the header directly because the tar crate refuses to build entries with `..`.
fn tar_gz(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    for (path, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        builder.append(&header, *data).unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap()
}

fn cifar_archive(extra: &[(&str, &[u8])]) -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    let mut batches: Vec<(String, Vec<u8>)> = (1..=5)
        .map(|i| (format!("data_batch_{i}.bin"), payload(3073 * i)))
        .collect();
    batches.push(("test_batch.bin".to_string(), payload(3073)));
    let paths: Vec<(String, &[u8])> = batches
        .iter()
        .map(|(name, data)| (format!("cifar-10-batches-bin/{name}"), data.as_slice()))
        .collect();
    let mut entries: Vec<(&str, &[u8])> = vec![
        (
            "cifar-10-batches-bin/batches.meta.txt",
            b"airplane\n".as_slice(),
        ),
        ("cifar-10-batches-bin/readme.html", b"<html/>".as_slice()),
    ];
    entries.extend(paths.iter().map(|(p, d)| (p.as_str(), *d)));
    entries.extend_from_slice(extra);
    (tar_gz(&entries), batches)
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn fetch_fresh_download_is_verified_and_put_in_place() {
    let data = payload(200_000);
    let server = Server::start(
        &[("/train-images-idx3-ubyte.gz", data.clone())],
        Mode::Ranges,
    );
    let dir = tempfile::tempdir().unwrap();
    let file = remote(&server, "train-images-idx3-ubyte.gz", &data);

    let outcome = fetcher().download(&file, dir.path()).unwrap();

    assert_eq!(outcome, Downloaded::Fresh);
    assert_eq!(std::fs::read(dir.path().join(&file.name)).unwrap(), data);
    assert_eq!(names_in(dir.path()), vec![file.name.clone()]);
    assert!(server.seen()[0].range.is_none());
}

#[test]
fn fetch_partial_download_resumes_with_a_range_request() {
    let data = payload(150_001);
    let server = Server::start(
        &[("/t10k-labels-idx1-ubyte.gz", data.clone())],
        Mode::Ranges,
    );
    let dir = tempfile::tempdir().unwrap();
    let file = remote(&server, "t10k-labels-idx1-ubyte.gz", &data);
    let half = data.len() / 2;
    std::fs::write(
        dir.path().join("t10k-labels-idx1-ubyte.gz.part"),
        &data[..half],
    )
    .unwrap();

    let outcome = fetcher().download(&file, dir.path()).unwrap();

    assert_eq!(outcome, Downloaded::Resumed { from: half as u64 });
    assert_eq!(std::fs::read(dir.path().join(&file.name)).unwrap(), data);
    assert_eq!(names_in(dir.path()), vec![file.name.clone()]);
    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].range.as_deref(),
        Some(format!("bytes={half}-").as_str())
    );
}

#[test]
fn fetch_server_ignoring_the_range_restarts_the_download() {
    let data = payload(80_000);
    let server = Server::start(&[("/a.gz", data.clone())], Mode::IgnoreRanges);
    let dir = tempfile::tempdir().unwrap();
    let file = remote(&server, "a.gz", &data);
    // A stale prefix that must not end up in front of the full body.
    std::fs::write(dir.path().join("a.gz.part"), &data[..1000]).unwrap();

    let outcome = fetcher().download(&file, dir.path()).unwrap();

    assert_eq!(outcome, Downloaded::Fresh);
    assert_eq!(std::fs::read(dir.path().join("a.gz")).unwrap(), data);
    assert!(server.seen()[0].range.is_some());
}

#[test]
fn fetch_complete_part_file_is_put_in_place_when_the_range_is_past_the_end() {
    let data = payload(5_000);
    let server = Server::start(&[("/b.gz", data.clone())], Mode::Ranges);
    let dir = tempfile::tempdir().unwrap();
    let file = remote(&server, "b.gz", &data);
    std::fs::write(dir.path().join("b.gz.part"), &data).unwrap();

    let outcome = fetcher().download(&file, dir.path()).unwrap();

    assert_eq!(
        outcome,
        Downloaded::Resumed {
            from: data.len() as u64
        }
    );

    assert_eq!(names_in(dir.path()), vec!["b.gz".to_string()]);
    assert_eq!(std::fs::read(dir.path().join("b.gz")).unwrap(), data);
}

#[test]
fn fetch_interrupted_transfer_keeps_its_bytes_for_the_next_run() {
    let data = payload(100_000);
    let dir = tempfile::tempdir().unwrap();
    let cut = Server::start(&[("/c.gz", data.clone())], Mode::CutHalfway);
    let file = remote(&cut, "c.gz", &data);

    let err = fetcher().download(&file, dir.path()).unwrap_err();
    assert!(matches!(err, FetchError::Transfer { .. }), "{err}");
    assert!(err.to_string().contains(&file.url), "{err}");
    assert!(!dir.path().join("c.gz").exists());

    let good = Server::start(&[("/c.gz", data.clone())], Mode::Ranges);
    let file = remote(&good, "c.gz", &data);
    let outcome = fetcher().download(&file, dir.path()).unwrap();
    assert!(matches!(outcome, Downloaded::Resumed { .. }), "{outcome:?}");
    assert_eq!(std::fs::read(dir.path().join("c.gz")).unwrap(), data);
}

#[test]
fn fetch_checksum_mismatch_is_an_error_and_leaves_no_file() {
    let data = payload(10_000);
    let server = Server::start(
        &[("/train-labels-idx1-ubyte.gz", data.clone())],
        Mode::Ranges,
    );
    let dir = tempfile::tempdir().unwrap();
    let expected = sha256(b"something else");
    let file = RemoteFile {
        sha256: expected.clone(),
        ..remote(&server, "train-labels-idx1-ubyte.gz", &data)
    };

    let err = fetcher().download(&file, dir.path()).unwrap_err();

    let message = err.to_string();
    assert!(
        matches!(err, FetchError::ChecksumMismatch { .. }),
        "{message}"
    );
    assert!(message.contains("train-labels-idx1-ubyte.gz"), "{message}");
    assert!(message.contains(&expected), "{message}");
    assert!(message.contains(&sha256(&data)), "{message}");
    assert!(
        names_in(dir.path()).is_empty(),
        "{:?}",
        names_in(dir.path())
    );
}

#[test]
fn fetch_http_404_names_the_url_and_status() {
    let server = Server::start(&[], Mode::Ranges);
    let dir = tempfile::tempdir().unwrap();
    let file = remote(&server, "missing.gz", b"");

    let err = fetcher().download(&file, dir.path()).unwrap_err();

    let message = err.to_string();
    assert!(matches!(err, FetchError::Status { .. }), "{message}");
    assert!(
        message.contains(&file.url) && message.contains("404"),
        "{message}"
    );
    assert!(names_in(dir.path()).is_empty());
}

#[test]
fn fetch_silent_server_times_out() {
    let server = Server::start(&[], Mode::Silent);
    let dir = tempfile::tempdir().unwrap();
    let file = remote(&server, "slow.gz", b"");
    let fetcher = Fetcher::new(Duration::from_secs(5), Duration::from_millis(300));

    let started = Instant::now();
    let err = fetcher.download(&file, dir.path()).unwrap_err();

    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(err.to_string().contains(&file.url), "{err}");
}

#[test]
fn fetch_file_already_in_place_is_not_downloaded_again() {
    let data = payload(1_000);
    let server = Server::start(&[("/d.gz", data.clone())], Mode::Ranges);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("d.gz"), &data).unwrap();

    let outcome = fetcher()
        .download(&remote(&server, "d.gz", &data), dir.path())
        .unwrap();

    assert_eq!(outcome, Downloaded::AlreadyPresent);
    assert!(server.seen().is_empty());
}

#[test]
fn fetch_unpacks_the_cifar_archive_flat() {
    let (archive, batches) = cifar_archive(&[]);
    let server = Server::start(
        &[("/mirror/cifar-10-binary.tar.gz", archive.clone())],
        Mode::Ranges,
    );
    let dir = tempfile::tempdir().unwrap();
    let files = vec![RemoteFile {
        name: "cifar-10-binary.tar.gz".to_string(),
        url: fetch::join_url(&server.url("/mirror/"), "cifar-10-binary.tar.gz"),
        sha256: sha256(&archive),
    }];

    fetch::fetch(&fetcher(), FetchDataset::Cifar10, &files, dir.path()).unwrap();

    for (name, data) in &batches {
        assert_eq!(
            &std::fs::read(dir.path().join(name)).unwrap(),
            data,
            "{name}"
        );
    }
    assert_eq!(
        std::fs::read(dir.path().join("batches.meta.txt")).unwrap(),
        b"airplane\n"
    );
    assert!(!dir.path().join("readme.html").exists());
    assert!(!dir.path().join("cifar-10-batches-bin").exists());
    assert!(names_in(dir.path())
        .iter()
        .all(|n| !n.ends_with(".tmp") && !n.ends_with(".part")));
}

#[test]
fn fetch_archive_with_parent_directory_entry_is_rejected() {
    let (archive, _) = cifar_archive(&[("../evil", b"gotcha".as_slice())]);
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    std::fs::create_dir(&dir).unwrap();
    let path = root.path().join("cifar-10-binary.tar.gz");
    std::fs::write(&path, archive).unwrap();

    let err = fetch::unpack_cifar10(&path, &dir).unwrap_err();

    assert!(matches!(err, FetchError::UnsafeEntry { .. }), "{err}");
    assert!(err.to_string().contains("../evil"), "{err}");
    assert!(!root.path().join("evil").exists());
}

#[test]
fn fetch_archive_with_absolute_entry_is_rejected() {
    let (archive, _) = cifar_archive(&[("/tmp/evil", b"gotcha".as_slice())]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cifar-10-binary.tar.gz");
    std::fs::write(&path, archive).unwrap();

    let err = fetch::unpack_cifar10(&path, dir.path()).unwrap_err();

    assert!(matches!(err, FetchError::UnsafeEntry { .. }), "{err}");
}

#[test]
fn fetch_archive_without_the_batches_is_an_error_naming_them() {
    let archive = tar_gz(&[(
        "cifar-10-batches-bin/test_batch.bin",
        payload(3073).as_slice(),
    )]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cifar-10-binary.tar.gz");
    std::fs::write(&path, archive).unwrap();

    let err = fetch::unpack_cifar10(&path, dir.path()).unwrap_err();

    assert!(err.to_string().contains("data_batch_1.bin"), "{err}");
}

#[test]
fn fetch_official_file_lists_have_sums_and_follow_the_base_url() {
    for dataset in [
        FetchDataset::Cifar10,
        FetchDataset::Mnist,
        FetchDataset::FashionMnist,
    ] {
        let official = dataset.remote_files(None);
        assert!(!official.is_empty());
        for file in &official {
            assert_eq!(file.sha256.len(), 64, "{file:?}");
            assert!(
                file.sha256.chars().all(|c| c.is_ascii_hexdigit()),
                "{file:?}"
            );
            assert!(file.url.starts_with(dataset.default_base_url()), "{file:?}");
            assert!(file.url.ends_with(&format!("/{}", file.name)), "{file:?}");
        }
        let mirrored = dataset.remote_files(Some("http://mirror.example/data"));
        for file in &mirrored {
            assert_eq!(
                file.url,
                format!("http://mirror.example/data/{}", file.name)
            );
        }
    }
}

#[test]
fn fetch_command_line_downloads_from_the_base_url() {
    // The fixture is not the real file, so the official checksum must reject it: that proves
    // the request went to the mirror and the compiled-in sum was applied.
    let server = Server::start(
        &[("/mirror/train-images-idx3-ubyte.gz", payload(100))],
        Mode::Ranges,
    );
    let dir = tempfile::tempdir().unwrap();
    let cli = edgesync_node::cli::Cli::try_parse_from([
        "dfl-node",
        "data",
        "fetch",
        "--dataset",
        "fashion-mnist",
        "--dir",
        dir.path().to_str().unwrap(),
        "--base-url",
        &server.url("/mirror"),
    ])
    .unwrap();

    let err = edgesync_node::cli::run(cli).unwrap_err();

    let message = format!("{err:#}");
    assert!(message.contains("SHA-256 mismatch"), "{message}");
    assert!(message.contains("3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"));
    assert_eq!(server.seen()[0].path, "/mirror/train-images-idx3-ubyte.gz");
    assert!(names_in(dir.path()).is_empty());
}
