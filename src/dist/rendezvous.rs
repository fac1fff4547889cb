//! The few bytes a run's processes must agree on before NCCL can connect them (its unique id),
//! handed from rank 0 to the others over TCP at `MASTER_ADDR:MASTER_PORT`, the variables
//! `torchrun` sets: what PyTorch's TCP store does for the same id, and nothing more.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// On rank 0, sends `bytes` to each of the `world - 1` other ranks (accepting them on `addr`'s
/// port, all interfaces) and returns them; on the others, connects to `addr` (retrying until
/// `timeout`, as rank 0 may start later) and returns what rank 0 sent. Every rank gets the same
/// bytes, or an error naming the address.
pub fn share_from_rank0(
    rank: usize,
    world: usize,
    addr: &str,
    bytes: Option<&[u8]>,
    len: usize,
    timeout: Duration,
) -> Result<Vec<u8>> {
    let fail = |what: String| Error::Distributed {
        rank,
        world,
        reason: format!("rendezvous at {addr}: {what}"),
    };
    if rank == 0 {
        let bytes = bytes.ok_or_else(|| fail("rank 0 has nothing to share".into()))?;
        if bytes.len() != len {
            return Err(fail(format!(
                "{} bytes to share, expected {len}",
                bytes.len()
            )));
        }
        let port = addr
            .rsplit_once(':')
            .map(|(_, p)| p)
            .ok_or_else(|| fail("expected HOST:PORT".into()))?;
        let listener = TcpListener::bind((
            "0.0.0.0",
            port.parse().map_err(|_| fail("bad port".into()))?,
        ))
        .map_err(|e| fail(format!("cannot listen: {e}")))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| fail(e.to_string()))?;
        let deadline = Instant::now() + timeout;
        let mut served = 0;
        while served + 1 < world {
            match listener.accept() {
                Ok((mut peer, _)) => {
                    peer.set_nonblocking(false)
                        .map_err(|e| fail(e.to_string()))?;
                    peer.write_all(bytes)
                        .map_err(|e| fail(format!("sending to a peer: {e}")))?;
                    served += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(fail(format!(
                            "only {served} of {} other ranks connected within {:.0} s",
                            world - 1,
                            timeout.as_secs_f64()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(fail(e.to_string())),
            }
        }
        return Ok(bytes.to_vec());
    }
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        let target = addr
            .to_socket_addrs()
            .map_err(|e| fail(format!("cannot resolve: {e}")))?
            .next()
            .ok_or_else(|| fail("resolves to no address".into()))?;
        match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
            Ok(mut stream) => {
                stream
                    .set_read_timeout(Some(timeout))
                    .map_err(|e| fail(e.to_string()))?;
                let mut out = vec![0u8; len];
                stream
                    .read_exact(&mut out)
                    .map_err(|e| fail(format!("reading from rank 0: {e}")))?;
                return Ok(out);
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(fail(format!(
        "rank 0 did not answer within {:.0} s ({last})",
        timeout.as_secs_f64()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loopback address whose port was free a moment ago.
    fn free_addr() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("127.0.0.1:{}", listener.local_addr().unwrap().port())
    }

    #[test]
    fn every_rank_gets_rank_zeros_bytes_even_when_rank_zero_starts_last() {
        let addr = free_addr();
        let id: Vec<u8> = (0..128u8).collect();
        let others: Vec<_> = (1..4)
            .map(|rank| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    share_from_rank0(rank, 4, &addr, None, 128, Duration::from_secs(20))
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let got = share_from_rank0(0, 4, &addr, Some(&id), 128, Duration::from_secs(20)).unwrap();
        assert_eq!(got, id);
        for t in others {
            assert_eq!(t.join().unwrap().unwrap(), id);
        }
    }

    #[test]
    fn a_missing_rank_zero_is_a_bounded_error_naming_the_address() {
        let addr = free_addr();
        let err = share_from_rank0(1, 2, &addr, None, 8, Duration::from_millis(500))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&addr) && err.contains("rank 1 of 2"), "{err}");
    }
}
