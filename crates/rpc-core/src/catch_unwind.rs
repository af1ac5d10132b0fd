//! A service method's future whose panic becomes an error answer.

use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;

use crate::Status;
use crate::server::BoxFuture;

/// Turns a panic in a service method into an error answer instead of a lost
/// task (and, in `direct` mode, a lost connection).
pub(crate) struct CatchUnwind(pub(crate) BoxFuture<Bytes>);

impl Future for CatchUnwind {
    type Output = Result<Result<Bytes, Status>, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = &mut self.0;
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(result)) => Poll::Ready(Ok(result)),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic".to_owned());
                Poll::Ready(Err(message))
            }
        }
    }
}
