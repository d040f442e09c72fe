//! What `serval listen` does with each stream: print it, echo it, or number its lines (the
//! stateful example service). Every mode hands its stream over when the instance's migration
//! agent asks (`serval migrate`), with its state, and takes streams moved in with theirs; and
//! every mode serves in steps (`Stream::commit`: a read, the state after it, what it sent),
//! which a hot standby replicates (`listen --standby-of`).

use std::io;

use serval::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How `serval listen` serves each stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Copy the stream to stdout; send nothing back.
    Print,
    /// Send everything back.
    Echo,
    /// Send each line back prefixed with its number in the connection (from 1), the count
    /// kept across moves between hosts.
    Number,
}

impl Mode {
    fn tag(self) -> u8 {
        match self {
            Mode::Print => b'P',
            Mode::Echo => b'E',
            Mode::Number => b'N',
        }
    }
}

/// A stream's state in [`Mode::Number`]: lines numbered so far, and the unfinished line.
#[derive(Debug, Default, PartialEq, Eq)]
struct Numbering {
    lines: u64,
    partial: Vec<u8>,
}

/// The state a stream carries through a move: the mode's tag, then its state.
fn encode(mode: Mode, n: &Numbering) -> Vec<u8> {
    let mut out = vec![mode.tag()];
    if mode == Mode::Number {
        out.extend_from_slice(&n.lines.to_be_bytes());
        out.extend_from_slice(&n.partial);
    }
    out
}

fn decode(mode: Mode, state: &[u8]) -> Result<Numbering, String> {
    match state.split_first() {
        Some((&tag, rest)) if tag == mode.tag() => match mode {
            Mode::Number => {
                let (lines, partial) = rest
                    .split_first_chunk::<8>()
                    .ok_or("a numbering state shorter than its count")?;
                Ok(Numbering {
                    lines: u64::from_be_bytes(*lines),
                    partial: partial.to_vec(),
                })
            }
            _ => Ok(Numbering::default()),
        },
        Some((&tag, _)) => Err(format!(
            "it was served in another mode ({:?}) than this instance's",
            char::from(tag)
        )),
        None => Err("it carried no state".into()),
    }
}

/// Serves one stream (accepted here, or moved in with its state) until it ends or moves away.
pub async fn serve(mut stream: Stream, mode: Mode) -> io::Result<()> {
    let mut state = match stream.take_app_state() {
        None => Numbering::default(),
        Some(s) => match decode(mode, &s) {
            Ok(n) => n,
            Err(e) => {
                stream.abort();
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a stream moved here was reset: {e}"),
                ));
            }
        },
    };
    // Each read and what it produced is one step (`Stream::commit`), so that a hot standby
    // resumes the stream exactly after the last one; the first step comes before any read.
    stream.commit(&encode(mode, &state), b"").await?;
    let mut stdout = tokio::io::stdout();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut io = &stream;
        let read = tokio::select! {
            () = stream.move_requested() => None,
            r = io.read(&mut buf) => Some(r),
        };
        let n = match read {
            None if stream.is_move_requested() => {
                if mode == Mode::Print {
                    stdout.flush().await?;
                }
                match stream.hand_over(&encode(mode, &state)).await {
                    Ok(()) => return Ok(()),
                    Err(f) => match f.stream {
                        Some(s) => {
                            note!("serval: a move failed, serving on here: {}", f.error);
                            stream = s;
                            continue;
                        }
                        None => return Err(f.error),
                    },
                }
            }
            // The connection closed: read what is left.
            None => io.read(&mut buf).await?,
            Some(r) => r?,
        };
        if n == 0 {
            break;
        }
        let data = &buf[..n];
        match mode {
            Mode::Print => {
                stdout.write_all(data).await?;
                stream.commit(&encode(mode, &state), b"").await?;
            }
            Mode::Echo => stream.commit(&encode(mode, &state), data).await?,
            Mode::Number => {
                let out = number(&mut state, data);
                stream.commit(&encode(mode, &state), &out).await?;
            }
        }
    }
    if mode == Mode::Print {
        stdout.flush().await?;
    }
    (&stream).shutdown().await?;
    crate::net::finish(&stream).await;
    Ok(())
}

/// Numbers the complete lines of `data` (after what `n` holds), keeping the rest.
fn number(n: &mut Numbering, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 16);
    for line in data.split_inclusive(|&b| b == b'\n') {
        n.partial.extend_from_slice(line);
        if line.ends_with(b"\n") {
            n.lines += 1;
            out.extend_from_slice(format!("{} ", n.lines).as_bytes());
            out.append(&mut n.partial);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbering_spans_reads_and_survives_its_encoding() {
        let mut n = Numbering::default();
        assert_eq!(number(&mut n, b"a\nb"), b"1 a\n");
        let moved = decode(Mode::Number, &encode(Mode::Number, &n)).expect("decodes");
        assert_eq!(moved, n);
        let mut n = moved;
        assert_eq!(number(&mut n, b"c\n\nd\n"), b"2 bc\n3 \n4 d\n");
        assert!(decode(Mode::Echo, &encode(Mode::Number, &n)).is_err());
        assert!(decode(Mode::Number, b"N1234").is_err());
        assert!(decode(Mode::Number, b"").is_err());
        assert_eq!(
            decode(Mode::Echo, &encode(Mode::Echo, &n)),
            Ok(Numbering::default())
        );
    }
}
