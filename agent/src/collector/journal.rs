//! The collector's journal: one JSON object per line in `<data-dir>/journal.jsonl`.
//!
//! It keeps what a restarted collector needs to continue without loss or duplicates. That is its
//! next stream sequence, the retained history it replays to clients, and a cursor per node: the
//! run id and the last agent sequence stored, which the agent resumes after. Live entries are appended one
//! line per write. Once enough lines have accumulated, the file is rewritten whole under a temporary
//! name and renamed over the old one, holding only the header, the cursors and the retained
//! history, so its size stays bounded by the history capacity.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use driftwatch_model::deviation::Deviation;
use serde::{Deserialize, Serialize};

use crate::api::hub::{Entry, EntryItem, NodeGap};

const FILE_NAME: &str = "journal.jsonl";

/// Position of a node's pushes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Random id of the agent process whose sequences `acknowledged` counts.
    pub run_id: u64,
    /// Last agent sequence stored from that run.
    pub acknowledged: u64,
    /// Deviations stored from the node over every run.
    pub received: u64,
    /// Deviations the node reported lost over every run.
    pub lost: u64,
}

/// Content of one journal line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
enum Record {
    /// Written first by a compaction: the sequence the next entry gets.
    Next { sequence: u64 },
    /// A node's cursor, written by a compaction and whenever a node starts a new run.
    Cursor { node: String, cursor: Cursor },
    /// An entry of the retained history, written by a compaction; it moves no cursor.
    Retained {
        sequence: u64,
        published_at: SystemTime,
        node: String,
        item: Item,
    },
    /// An entry as it was stored; it moves its node's cursor to `agent_sequence`.
    Entry {
        sequence: u64,
        published_at: SystemTime,
        node: String,
        run_id: u64,
        agent_sequence: u64,
        item: Item,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Item {
    Deviation(Deviation),
    /// Agent sequences the node lost.
    Gap { first_sequence: u64, last_sequence: u64 },
}

/// Errors from opening a journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("failed to create the data directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("failed to read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}:{line}: invalid journal record: {reason}; move the file away to start with an empty history")]
    Invalid { path: PathBuf, line: usize, reason: String },
    #[error("failed to open {path} for appending: {source}")]
    Open { path: PathBuf, source: io::Error },
}

/// Content of a journal when it was opened.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Sequence the next entry gets, at least 1.
    pub next_sequence: u64,
    /// Retained history, oldest first.
    pub entries: Vec<Entry>,
    pub cursors: BTreeMap<String, Cursor>,
}

/// An open journal; see the module documentation.
pub struct Journal {
    path: PathBuf,
    file: File,
    lines_since_compaction: usize,
}

impl Journal {
    /// Opens (or creates) the journal in `dir` and reads what it holds. `keep` bounds the history
    /// returned, oldest entries first out. A last line cut short by a crash is ignored.
    ///
    /// # Errors
    ///
    /// When the directory or file cannot be created or read, or a line other than the last does
    /// not parse, naming the file and line.
    pub fn open(dir: &Path, keep: usize) -> Result<(Journal, Recovered), JournalError> {
        fs::create_dir_all(dir).map_err(|source| JournalError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(FILE_NAME);
        let (recovered, lines) = match File::open(&path) {
            Ok(file) => read_records(&path, file, keep)?,
            Err(error) if error.kind() == io::ErrorKind::NotFound => (
                Recovered {
                    next_sequence: 1,
                    ..Recovered::default()
                },
                0,
            ),
            Err(source) => return Err(JournalError::Read { path, source }),
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| JournalError::Open {
                path: path.clone(),
                source,
            })?;
        let journal = Journal {
            path,
            file,
            lines_since_compaction: lines,
        };
        Ok((journal, recovered))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Lines appended since the file was last rewritten (or opened).
    pub fn lines_since_compaction(&self) -> usize {
        self.lines_since_compaction
    }

    /// Appends an entry that moves `node`'s cursor to `agent_sequence` of run `run_id`.
    ///
    /// NOTE: the line reaches the kernel with one write(2) but is not fsynced, so it survives the
    /// collector being killed but not the machine losing power.
    pub fn append_entry(&mut self, entry: &Entry, run_id: u64, agent_sequence: u64) -> io::Result<()> {
        let (node, item) = item_to_record(&entry.item);
        self.append(&Record::Entry {
            sequence: entry.sequence,
            published_at: entry.published_at,
            node,
            run_id,
            agent_sequence,
            item,
        })
    }

    /// Appends a node's cursor, as when it starts a new run.
    pub fn append_cursor(&mut self, node: &str, cursor: Cursor) -> io::Result<()> {
        self.append(&Record::Cursor {
            node: node.to_owned(),
            cursor,
        })
    }

    fn append(&mut self, record: &Record) -> io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.lines_since_compaction += 1;
        Ok(())
    }

    /// Rewrites the file with only the next sequence, the cursors and the retained history.
    pub fn compact(
        &mut self,
        next_sequence: u64,
        cursors: &BTreeMap<String, Cursor>,
        retained: &[Entry],
    ) -> io::Result<()> {
        let partial = self.path.with_extension("jsonl.partial");
        let mut out = io::BufWriter::new(File::create(&partial)?);
        let mut write = |record: &Record| -> io::Result<()> {
            serde_json::to_writer(&mut out, record).map_err(io::Error::other)?;
            out.write_all(b"\n")
        };
        write(&Record::Next {
            sequence: next_sequence,
        })?;
        for (node, cursor) in cursors {
            write(&Record::Cursor {
                node: node.clone(),
                cursor: *cursor,
            })?;
        }
        for entry in retained {
            let (node, item) = item_to_record(&entry.item);
            write(&Record::Retained {
                sequence: entry.sequence,
                published_at: entry.published_at,
                node,
                item,
            })?;
        }
        let file = out.into_inner().map_err(|err| err.into_error())?;
        file.sync_all()?;
        drop(file);
        fs::rename(&partial, &self.path)?;
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.lines_since_compaction = 0;
        Ok(())
    }
}

fn item_to_record(item: &EntryItem) -> (String, Item) {
    match item {
        EntryItem::Deviation { node, deviation } => {
            (node.to_string(), Item::Deviation(Deviation::clone(deviation)))
        }
        EntryItem::NodeGap(gap) => (
            gap.node.to_string(),
            Item::Gap {
                first_sequence: gap.first_sequence,
                last_sequence: gap.last_sequence,
            },
        ),
    }
}

fn item_from_record(node: String, item: Item) -> EntryItem {
    let node: Arc<str> = Arc::from(node);
    match item {
        Item::Deviation(deviation) => EntryItem::Deviation {
            node,
            deviation: Arc::new(deviation),
        },
        Item::Gap {
            first_sequence,
            last_sequence,
        } => EntryItem::NodeGap(NodeGap {
            node,
            first_sequence,
            last_sequence,
        }),
    }
}

/// Reads every record; returns what they add up to and the number of lines read.
fn read_records(path: &Path, file: File, keep: usize) -> Result<(Recovered, usize), JournalError> {
    let lines: Vec<String> = BufReader::new(file)
        .lines()
        .collect::<Result<_, _>>()
        .map_err(|source| JournalError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    let mut recovered = Recovered {
        next_sequence: 1,
        ..Recovered::default()
    };
    let mut entries = std::collections::VecDeque::new();
    let count = lines.len();
    for (index, line) in lines.into_iter().enumerate() {
        let record: Record = match serde_json::from_str(&line) {
            Ok(record) => record,
            // A crash during the last write leaves a partial line, which was never acknowledged.
            Err(_) if index + 1 == count => {
                tracing::warn!(path = %path.display(), line = index + 1, "ignoring a partial last journal line");
                break;
            }
            Err(error) => {
                return Err(JournalError::Invalid {
                    path: path.to_path_buf(),
                    line: index + 1,
                    reason: error.to_string(),
                })
            }
        };
        let entry = match record {
            Record::Next { sequence } => {
                recovered.next_sequence = recovered.next_sequence.max(sequence);
                continue;
            }
            Record::Cursor { node, cursor } => {
                recovered.cursors.insert(node, cursor);
                continue;
            }
            Record::Retained {
                sequence,
                published_at,
                node,
                item,
            } => Entry {
                sequence,
                published_at,
                item: item_from_record(node, item),
            },
            Record::Entry {
                sequence,
                published_at,
                node,
                run_id,
                agent_sequence,
                item,
            } => {
                let cursor = recovered.cursors.entry(node.clone()).or_default();
                if cursor.run_id != run_id {
                    cursor.run_id = run_id;
                    cursor.acknowledged = 0;
                }
                cursor.acknowledged = cursor.acknowledged.max(agent_sequence);
                match &item {
                    Item::Deviation(_) => cursor.received += 1,
                    Item::Gap {
                        first_sequence,
                        last_sequence,
                    } => cursor.lost += last_sequence - first_sequence + 1,
                }
                Entry {
                    sequence,
                    published_at,
                    item: item_from_record(node, item),
                }
            }
        };
        recovered.next_sequence = recovered.next_sequence.max(entry.sequence + 1);
        entries.push_back(entry);
        if entries.len() > keep.max(1) {
            entries.pop_front();
        }
    }
    recovered.entries = entries.into();
    Ok((recovered, count))
}

#[cfg(test)]
#[path = "journal_tests.rs"]
mod tests;
