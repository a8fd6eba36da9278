//! Layers that pass requests on to the backend below them: [`Filter`], and [`Below`],
//! through which a filter reaches that backend.

use std::future::Future;
use std::ops::Deref;

use bytes::Bytes;

use super::{Backend, BlockSize, Capabilities, ZeroFlags};
use crate::block::{DepthExtent, DirtyExtent, Extent, ReadChunk};
use crate::error::Result;

/// How a [`Filter`] holds the backend below it.
///
/// A backend holds itself: [`Below::hold`] is ready at once and adds nothing to a
/// request. A layer whose backend can be replaced hands out a lock guard instead.
pub trait Below: Send + Sync + 'static {
    /// The backend held.
    type Backend: Backend;

    /// Holds the backend for one request, which keeps the returned guard until it ends.
    fn hold(
        &self,
    ) -> impl Future<Output = impl Deref<Target = Self::Backend> + Send + Sync + '_> + Send;

    /// The backend, for the synchronous methods (size, capabilities, block size, dirty
    /// bitmaps): they cannot wait, and nothing holds the result for long.
    fn now(&self) -> impl Deref<Target = Self::Backend> + '_;
}

impl<B: Backend> Below for B {
    type Backend = B;

    fn hold(&self) -> impl Future<Output = impl Deref<Target = B> + Send + Sync + '_> + Send {
        std::future::ready(self)
    }

    fn now(&self) -> impl Deref<Target = B> + '_ {
        self
    }
}

/// Generates [`Filter`], with a default that forwards each method of [`Backend`], and
/// the [`Backend`] of every filter.
macro_rules! filter {
    (
        $(fn $sync:ident() -> $sync_out:ty;)*
        $(async fn $name:ident($($arg:ident: $ty:ty),*) -> $out:ty;)*
    ) => {
        /// A layer over another backend that changes some requests and passes the rest
        /// on, the way nbdkit filters do; every filter is a [`Backend`], so filters stack.
        ///
        /// Each method is the [`Backend`] method of the same name. A layer writes only
        /// what it changes: every method it leaves out passes the request, unchanged, to
        /// the backend below. Forwarding is the default because it is the only safe one:
        /// a layer that answered with [`Backend`]'s own defaults instead would, for
        /// example, copy what the backend below reads for the kernel, or hide its
        /// snapshots.
        ///
        /// The backend below is reached through [`Below`]: most layers own it and reach
        /// it at once; [`super::Switchable`] keeps it behind a lock, so that each request
        /// holds it while it runs and a replacement waits for them.
        pub trait Filter: Send + Sync + 'static {
            /// What holds the backend below: that backend itself, for most layers.
            type Inner: Below;

            /// The backend below, as this layer holds it.
            fn inner(&self) -> &Self::Inner;

            $(
                #[doc = concat!("[`Backend::", stringify!($sync), "`]: by default the backend below's.")]
                fn $sync(&self) -> $sync_out {
                    Backend::$sync(&*self.inner().now())
                }
            )*

            $(
                #[doc = concat!("[`Backend::", stringify!($name), "`]: by default passed on to the backend below.")]
                fn $name(&self, $($arg: $ty),*) -> impl Future<Output = Result<$out>> + Send {
                    async move {
                        let below = self.inner().hold().await;
                        Backend::$name(&*below, $($arg),*).await
                    }
                }
            )*
        }

        impl<F: Filter> Backend for F {
            $(fn $sync(&self) -> $sync_out {
                Filter::$sync(self)
            })*
            $(fn $name(&self, $($arg: $ty),*) -> impl Future<Output = Result<$out>> + Send {
                Filter::$name(self, $($arg),*)
            })*
        }
    };
}

backend_methods!(filter);
