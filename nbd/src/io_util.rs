//! Small stream helpers shared by negotiation and transmission: reading one whole message
//! while telling a clean end of stream (between messages) from a truncated one, and skipping
//! payload the server won't keep without holding it in memory.

use tokio::io::{AsyncRead, AsyncReadExt};

/// Fills `buf` with the next message. `Ok(false)` when the stream ended cleanly before its
/// first byte; an end of stream inside the message is `UnexpectedEof`.
pub(crate) async fn read_message<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut [u8],
) -> std::io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = rd.read(&mut buf[filled..]).await?;
        if n == 0 {
            if filled == 0 {
                return Ok(false);
            }
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        filled += n;
    }
    Ok(true)
}

/// Reads and drops exactly `len` bytes.
pub(crate) async fn discard<R: AsyncRead + Unpin>(rd: &mut R, len: u64) -> std::io::Result<()> {
    let copied = tokio::io::copy(&mut (&mut *rd).take(len), &mut tokio::io::sink()).await?;
    if copied < len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn clean_and_truncated_ends_differ() {
        let mut buf = [0u8; 4];
        let mut empty: &[u8] = &[];
        assert!(!read_message(&mut empty, &mut buf).await.expect("clean end"));
        let mut short: &[u8] = &[1, 2];
        let err = read_message(&mut short, &mut buf)
            .await
            .expect_err("truncated");
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        let mut whole: &[u8] = &[1, 2, 3, 4, 5];
        assert!(read_message(&mut whole, &mut buf).await.expect("whole"));
        assert_eq!(buf, [1, 2, 3, 4]);
        assert_eq!(whole, &[5]);
    }

    #[tokio::test]
    async fn discard_skips_exactly() {
        let mut data: &[u8] = &[1, 2, 3, 4, 5];
        discard(&mut data, 3).await.expect("discard");
        assert_eq!(data, &[4, 5]);
        assert!(discard(&mut data, 3).await.is_err());
    }
}
