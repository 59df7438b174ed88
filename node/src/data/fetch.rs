//! Downloading the public datasets a node can train on from their official distribution
//! points, for users with internet access.
//!
//! Every file is checked against a SHA-256 sum compiled into the binary before it is put in
//! place, so a node never trains on a truncated or tampered copy. Downloads go to
//! `<file>.part` first and resume from its length after an interruption, which matters for
//! CIFAR-10's 170 MB archive on the slow links edge devices tend to have.
//!
//! The network layer sees only [`RemoteFile`]s, so tests (and users of a private mirror with
//! different files) can supply their own names, addresses and sums.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, IsTerminal, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

/// Default wait for a TCP (and TLS) connection to be set up.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default wait for any single read from the server, headers included: a stalled transfer
/// fails after this long instead of hanging, and a rerun resumes it.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// CIFAR-10's binary release, from its authors' page.
pub const CIFAR10_BASE_URL: &str = "https://www.cs.toronto.edu/~kriz/";
/// The MNIST mirror torchvision uses; the original yann.lecun.com site often refuses
/// downloads.
pub const MNIST_BASE_URL: &str = "https://ossci-datasets.s3.amazonaws.com/mnist/";
/// Fashion-MNIST's distribution point, as given by its authors.
pub const FASHION_MNIST_BASE_URL: &str =
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/";

/// Name of CIFAR-10's archive and the SHA-256 sum of the official file.
const CIFAR10_FILES: [(&str, &str); 1] = [(
    "cifar-10-binary.tar.gz",
    "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
)];

const MNIST_FILES: [(&str, &str); 4] = [
    (
        "train-images-idx3-ubyte.gz",
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    ),
    (
        "train-labels-idx1-ubyte.gz",
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    ),
    (
        "t10k-images-idx3-ubyte.gz",
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    ),
    (
        "t10k-labels-idx1-ubyte.gz",
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    ),
];

const FASHION_MNIST_FILES: [(&str, &str); 4] = [
    (
        "train-images-idx3-ubyte.gz",
        "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    ),
    (
        "train-labels-idx1-ubyte.gz",
        "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    ),
    (
        "t10k-images-idx3-ubyte.gz",
        "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    ),
    (
        "t10k-labels-idx1-ubyte.gz",
        "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    ),
];

/// Folder of CIFAR-10's archive that holds the binary batches.
const CIFAR10_ARCHIVE_DIR: &str = "cifar-10-batches-bin";
/// The batches the CIFAR-10 loader reads; all must be in the archive.
const CIFAR10_BATCHES: [&str; 6] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
    "test_batch.bin",
];
/// Class names in label order; copied when present because it documents the labels.
const CIFAR10_META: &str = "batches.meta.txt";

/// What went wrong fetching a dataset; every variant names the file or address at fault.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("GET {url} failed: {source}")]
    Request {
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
    #[error("GET {url}: server answered HTTP {status}")]
    Status {
        url: String,
        status: ureq::http::StatusCode,
    },
    #[error("GET {url}: {detail}")]
    Protocol { url: String, detail: String },
    #[error(
        "GET {url}: transfer broke off after {received} bytes of this file ({source}); \
             run the command again to resume"
    )]
    Transfer {
        url: String,
        received: u64,
        #[source]
        source: io::Error,
    },
    #[error(
        "{name}: SHA-256 mismatch: expected {expected}, found {found}; \
             the download was deleted"
    )]
    ChecksumMismatch {
        name: String,
        expected: String,
        found: String,
    },
    #[error("{archive}: refusing entry {entry:?}: absolute paths and `..` are not allowed")]
    UnsafeEntry { archive: PathBuf, entry: String },
    #[error("{archive}: entry {entry} is not a regular file")]
    NotAFile { archive: PathBuf, entry: String },
    #[error("{archive}: missing {}", missing.join(", "))]
    MissingEntries {
        archive: PathBuf,
        missing: Vec<String>,
    },
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FetchError + 'a {
    move |source| FetchError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The datasets `dfl-node data fetch` can download.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FetchDataset {
    /// CIFAR-10, binary release; unpacked to data_batch_*.bin and test_batch.bin.
    Cifar10,
    /// MNIST digits, the four IDX files kept gzip-compressed.
    Mnist,
    /// Fashion-MNIST, the four IDX files kept gzip-compressed.
    FashionMnist,
}

impl FetchDataset {
    pub fn as_str(self) -> &'static str {
        match self {
            FetchDataset::Cifar10 => "cifar10",
            FetchDataset::Mnist => "mnist",
            FetchDataset::FashionMnist => "fashion-mnist",
        }
    }

    /// Folder URL the files are downloaded from unless a mirror is given.
    pub fn default_base_url(self) -> &'static str {
        match self {
            FetchDataset::Cifar10 => CIFAR10_BASE_URL,
            FetchDataset::Mnist => MNIST_BASE_URL,
            FetchDataset::FashionMnist => FASHION_MNIST_BASE_URL,
        }
    }

    fn known_files(self) -> &'static [(&'static str, &'static str)] {
        match self {
            FetchDataset::Cifar10 => &CIFAR10_FILES,
            FetchDataset::Mnist => &MNIST_FILES,
            FetchDataset::FashionMnist => &FASHION_MNIST_FILES,
        }
    }

    /// The official files of this dataset with their published SHA-256 sums, downloaded from
    /// `base_url` (a mirror holding the same file names) or else the official address.
    pub fn remote_files(self, base_url: Option<&str>) -> Vec<RemoteFile> {
        let base = base_url.unwrap_or(self.default_base_url());
        self.known_files()
            .iter()
            .map(|(name, sha256)| RemoteFile {
                name: name.to_string(),
                url: join_url(base, name),
                sha256: sha256.to_string(),
            })
            .collect()
    }
}

/// `base` and `name` joined by exactly one slash, so mirrors can be given either way.
pub fn join_url(base: &str, name: &str) -> String {
    format!("{}/{name}", base.trim_end_matches('/'))
}

/// One file to download and the SHA-256 sum (lowercase or uppercase hex) it must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFile {
    /// File name in the destination folder.
    pub name: String,
    pub url: String,
    pub sha256: String,
}

/// How [`Fetcher::download`] came by a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Downloaded {
    /// The file was already in place with the right sum; nothing was requested.
    AlreadyPresent,
    /// The whole file was transferred.
    Fresh,
    /// An earlier partial download was continued from this many bytes.
    Resumed { from: u64 },
}

/// Downloads files over HTTP(S) with timeouts, resumption and checksum verification.
#[derive(Debug, Clone)]
pub struct Fetcher {
    agent: ureq::Agent,
    /// Draw progress bars; otherwise report progress as log lines.
    bars: bool,
}

impl Default for Fetcher {
    fn default() -> Self {
        Fetcher::new(DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT)
    }
}

impl Fetcher {
    /// A fetcher that gives up on a connection after `connect_timeout` and on a transfer that
    /// delivers nothing for `read_timeout`. Progress bars are drawn when stderr is a terminal.
    pub fn new(connect_timeout: Duration, read_timeout: Duration) -> Self {
        let config = ureq::Agent::config_builder()
            // Statuses are handled here, so a 404 can be reported with its URL and a 200 to a
            // range request can restart the download.
            .http_status_as_error(false)
            .user_agent(concat!("edgesync-node/", env!("CARGO_PKG_VERSION")))
            .timeout_resolve(Some(connect_timeout))
            .timeout_connect(Some(connect_timeout))
            .timeout_send_request(Some(read_timeout))
            .timeout_recv_response(Some(read_timeout))
            // Per read rather than for the whole body: a large file on a slow link may take
            // hours, but a silent server should not hold the command forever.
            .timeout_per_read(Some(read_timeout))
            .build();
        Fetcher {
            agent: config.into(),
            bars: io::stderr().is_terminal(),
        }
    }

    /// Downloads `file` into `dir` unless it is already there with the right sum.
    ///
    /// Bytes go to `<name>.part`, which a later call continues with a range request; only a
    /// file whose SHA-256 matches is renamed into place. On a mismatch the `.part` file is
    /// deleted so the next attempt starts clean.
    pub fn download(&self, file: &RemoteFile, dir: &Path) -> Result<Downloaded, FetchError> {
        fs::create_dir_all(dir).map_err(io_error("create folder", dir))?;
        let dest = dir.join(&file.name);
        let expected = file.sha256.to_ascii_lowercase();
        if dest.is_file() {
            let found = sha256_file(&dest)?;
            if found == expected {
                tracing::info!(file = %dest.display(), "already present, SHA-256 verified");
                return Ok(Downloaded::AlreadyPresent);
            }
            tracing::warn!(
                file = %dest.display(),
                %expected,
                %found,
                "present but with the wrong SHA-256; downloading it again"
            );
        }

        let part = dir.join(format!("{}.part", file.name));
        let (outcome, found) = self.transfer(file, &part)?;
        if found != expected {
            fs::remove_file(&part).map_err(io_error("delete", &part))?;
            return Err(FetchError::ChecksumMismatch {
                name: file.name.clone(),
                expected,
                found,
            });
        }
        fs::rename(&part, &dest).map_err(io_error("rename into place", &part))?;
        tracing::info!(file = %dest.display(), "downloaded, SHA-256 verified");
        Ok(outcome)
    }

    /// Brings `part` up to the full file and returns how, with its SHA-256 sum.
    fn transfer(&self, file: &RemoteFile, part: &Path) -> Result<(Downloaded, String), FetchError> {
        let url = file.url.as_str();
        let mut offset = match fs::metadata(part) {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_error("read", part)(e)),
        };
        // One retry from scratch when the server rejects the range of a stale `.part`.
        for _ in 0..2 {
            let mut request = self
                .agent
                .get(url)
                // The sum is of the bytes as published, so the server must not re-encode
                // them (and a range only makes sense on the stored bytes).
                .header("Accept-Encoding", "identity");
            if offset > 0 {
                request = request.header("Range", format!("bytes={offset}-"));
            }
            let response = request.call().map_err(|source| FetchError::Request {
                url: url.to_string(),
                source: Box::new(source),
            })?;
            let status = response.status();
            let resumed = match status.as_u16() {
                200 => false,
                206 if offset > 0 => {
                    check_content_range(url, &response, offset)?;
                    true
                }
                416 if offset > 0 => {
                    // The `.part` may hold the complete file from a run that stopped before
                    // renaming it; anything else about it is unusable.
                    let found = sha256_file(part)?;
                    if found == file.sha256.to_ascii_lowercase() {
                        return Ok((Downloaded::Resumed { from: offset }, found));
                    }
                    tracing::warn!(file = %part.display(), "server rejected the resume range; \
                                   starting over");
                    fs::remove_file(part).map_err(io_error("delete", part))?;
                    offset = 0;
                    continue;
                }
                _ => {
                    return Err(FetchError::Status {
                        url: url.to_string(),
                        status,
                    })
                }
            };
            if let Some(encoding) = header(&response, "content-encoding") {
                if !encoding.eq_ignore_ascii_case("identity") {
                    return Err(FetchError::Protocol {
                        url: url.to_string(),
                        detail: format!(
                            "server sent the file with Content-Encoding {encoding}, which \
                             alters its bytes"
                        ),
                    });
                }
            }
            let length = header(&response, "content-length").and_then(|v| v.parse::<u64>().ok());

            let mut hasher = Sha256::new();
            let mut out = if resumed {
                // The hash covers the whole file, so the bytes already on disk go first.
                let mut existing = File::open(part).map_err(io_error("read", part))?;
                io::copy(&mut existing, &mut hasher).map_err(io_error("read", part))?;
                OpenOptions::new()
                    .append(true)
                    .open(part)
                    .map_err(io_error("write", part))?
            } else {
                if offset > 0 {
                    tracing::info!(url, "server ignored the resume range; starting over");
                }
                File::create(part).map_err(io_error("write", part))?
            };
            let start = if resumed { offset } else { 0 };
            let total = length.map(|n| n + start);
            if resumed {
                tracing::info!(url, from = start, "resuming download");
            } else {
                tracing::info!(url, size = total, "downloading");
            }

            let mut progress = Progress::new(self.bars, &file.name, start, total);
            let mut body = response.into_body().into_reader();
            let mut buf = vec![0u8; 64 * 1024];
            let mut received = start;
            loop {
                let n = match body.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(source) => {
                        progress.abandon();
                        // Keep what arrived: flushing it lets the next run resume from here.
                        let _ = out.sync_all();
                        return Err(FetchError::Transfer {
                            url: url.to_string(),
                            received,
                            source,
                        });
                    }
                };
                out.write_all(&buf[..n]).map_err(io_error("write", part))?;
                hasher.update(&buf[..n]);
                received += n as u64;
                progress.advance(received);
            }
            progress.finish();
            out.sync_all().map_err(io_error("write", part))?;
            if let Some(total) = total {
                if received != total {
                    return Err(FetchError::Protocol {
                        url: url.to_string(),
                        detail: format!("expected {total} bytes, received {received}"),
                    });
                }
            }
            let outcome = if resumed {
                Downloaded::Resumed { from: start }
            } else {
                Downloaded::Fresh
            };
            return Ok((outcome, hex::encode(hasher.finalize())));
        }
        Err(FetchError::Protocol {
            url: url.to_string(),
            detail: "server keeps rejecting the requested range".to_string(),
        })
    }
}

fn header<'a>(response: &'a ureq::http::Response<ureq::Body>, name: &str) -> Option<&'a str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

/// Checks that a 206 answer continues the file where the `.part` ends; appending any other
/// range would corrupt it.
fn check_content_range(
    url: &str,
    response: &ureq::http::Response<ureq::Body>,
    offset: u64,
) -> Result<(), FetchError> {
    let range = header(response, "content-range").unwrap_or("");
    // "bytes <first>-<last>/<size>"
    let first = range
        .strip_prefix("bytes ")
        .and_then(|r| r.split('-').next())
        .and_then(|f| f.trim().parse::<u64>().ok());
    if first == Some(offset) {
        Ok(())
    } else {
        Err(FetchError::Protocol {
            url: url.to_string(),
            detail: format!("asked for bytes from {offset}, got Content-Range {range:?}"),
        })
    }
}

/// Progress of one download: a bar on a terminal, a log line every few seconds otherwise.
enum Progress {
    Bar(ProgressBar),
    Log {
        name: String,
        total: Option<u64>,
        last: Instant,
    },
}

/// How often progress is logged when no bar is drawn.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

impl Progress {
    fn new(bars: bool, name: &str, start: u64, total: Option<u64>) -> Progress {
        if !bars {
            return Progress::Log {
                name: name.to_string(),
                total,
                last: Instant::now(),
            };
        }
        let (bar, template) = match total {
            Some(total) => (
                ProgressBar::new(total),
                "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            ),
            None => (
                ProgressBar::no_length(),
                "{msg} {spinner} {bytes} {bytes_per_sec}",
            ),
        };
        bar.set_style(
            ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(name.to_string());
        // Measure the rate from here, not from the resumed bytes, so the ETA is honest.
        bar.set_position(start);
        bar.reset_eta();
        Progress::Bar(bar)
    }

    fn advance(&mut self, received: u64) {
        match self {
            Progress::Bar(bar) => bar.set_position(received),
            Progress::Log { name, total, last } => {
                if last.elapsed() < LOG_INTERVAL {
                    return;
                }
                *last = Instant::now();
                match total {
                    Some(total) => tracing::info!(
                        "{name}: {} of {} ({:.0}%)",
                        HumanBytes(received),
                        HumanBytes(*total),
                        received as f64 * 100.0 / (*total).max(1) as f64
                    ),
                    None => tracing::info!("{name}: {}", HumanBytes(received)),
                }
            }
        }
    }

    fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish();
        }
    }

    fn abandon(&self) {
        if let Progress::Bar(bar) = self {
            bar.abandon();
        }
    }
}

/// Hex SHA-256 of the file at `path`.
pub fn sha256_file(path: &Path) -> Result<String, FetchError> {
    let mut file = File::open(path).map_err(io_error("read", path))?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher).map_err(io_error("read", path))?;
    Ok(hex::encode(hasher.finalize()))
}

/// Downloads `files` of `dataset` into `dir` and, for CIFAR-10, unpacks the batches next to
/// the archive, giving the layout [`crate::data::load`] reads. Returns the paths written or
/// verified, archive included.
pub fn fetch(
    fetcher: &Fetcher,
    dataset: FetchDataset,
    files: &[RemoteFile],
    dir: &Path,
) -> Result<Vec<PathBuf>, FetchError> {
    let mut paths = Vec::new();
    for file in files {
        fetcher.download(file, dir)?;
        paths.push(dir.join(&file.name));
    }
    if dataset == FetchDataset::Cifar10 {
        let mut unpacked = Vec::new();
        for archive in paths
            .iter()
            .filter(|p| p.to_string_lossy().ends_with(".tar.gz"))
        {
            unpacked.extend(unpack_cifar10(archive, dir)?);
        }
        paths.extend(unpacked);
    }
    Ok(paths)
}

/// Extracts CIFAR-10's binary batches (and `batches.meta.txt`) from `archive` into `dir`,
/// flattening the archive's `cifar-10-batches-bin/` folder. Each file is written under a
/// temporary name and renamed, so an interrupted run never leaves a truncated batch that the
/// loader would accept. Fails on any entry with an absolute path or `..`, even one it would
/// not extract, since such an archive is not the official one.
pub fn unpack_cifar10(archive: &Path, dir: &Path) -> Result<Vec<PathBuf>, FetchError> {
    tracing::info!(archive = %archive.display(), "unpacking");
    fs::create_dir_all(dir).map_err(io_error("create folder", dir))?;
    let file = File::open(archive).map_err(io_error("read", archive))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(io::BufReader::new(file)));
    let entries = tar.entries().map_err(io_error("read", archive))?;
    let mut written = Vec::new();
    for entry in entries {
        let mut entry = entry.map_err(io_error("read", archive))?;
        let path = entry
            .path()
            .map_err(io_error("read", archive))?
            .into_owned();
        if !is_safe_entry(&path) {
            return Err(FetchError::UnsafeEntry {
                archive: archive.to_path_buf(),
                entry: path.to_string_lossy().into_owned(),
            });
        }
        let Some(name) = wanted_cifar10_entry(&path) else {
            continue;
        };
        if !entry.header().entry_type().is_file() {
            return Err(FetchError::NotAFile {
                archive: archive.to_path_buf(),
                entry: path.to_string_lossy().into_owned(),
            });
        }
        let dest = dir.join(name);
        let tmp = dir.join(format!("{name}.tmp"));
        let mut out = File::create(&tmp).map_err(io_error("write", &tmp))?;
        io::copy(&mut entry, &mut out).map_err(|source| {
            let _ = fs::remove_file(&tmp);
            FetchError::Io {
                action: "extract",
                path: archive.join(&path),
                source,
            }
        })?;
        out.sync_all().map_err(io_error("write", &tmp))?;
        drop(out);
        fs::rename(&tmp, &dest).map_err(io_error("rename into place", &tmp))?;
        written.push(dest);
    }
    let missing: Vec<String> = CIFAR10_BATCHES
        .iter()
        .filter(|b| !written.iter().any(|w| w.file_name() == Some(OsStr::new(b))))
        .map(|b| format!("{CIFAR10_ARCHIVE_DIR}/{b}"))
        .collect();
    if !missing.is_empty() {
        return Err(FetchError::MissingEntries {
            archive: archive.to_path_buf(),
            missing,
        });
    }
    Ok(written)
}

/// Relative paths that stay inside the destination: no root, drive prefix or `..`.
fn is_safe_entry(path: &Path) -> bool {
    path.components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        && path.components().next().is_some()
}

/// The destination name of an archive entry worth extracting.
fn wanted_cifar10_entry(path: &Path) -> Option<&'static str> {
    let mut parts = path.components().filter(|c| *c != Component::CurDir);
    let (Some(Component::Normal(folder)), Some(Component::Normal(file)), None) =
        (parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    if folder != CIFAR10_ARCHIVE_DIR {
        return None;
    }
    CIFAR10_BATCHES
        .iter()
        .chain(std::iter::once(&CIFAR10_META))
        .find(|name| file == **name)
        .copied()
}
