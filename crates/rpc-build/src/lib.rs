//! Turns `.proto` service definitions into typed clients and server traits
//! for this framework, from a build script, with no `protoc` on the machine:
//! [protox](https://docs.rs/protox) parses the files in pure Rust and
//! prost-build generates the messages.
//!
//! For `service Greeter { rpc SayHello(HelloRequest) returns (HelloReply); }`
//! in package `demo`, the generated module holds, beside the messages:
//!
//! - `GreeterClient<I>`: `async fn say_hello(&self, HelloRequest) -> Result<HelloReply, rpc_core::Error>`
//!   (and `say_hello_with(request, CallOptions)`), over any [`rpc_core::Invoker`];
//! - `trait Greeter`: `fn say_hello(&self, Request<HelloRequest>) -> impl Future<Output = Result<HelloReply, Status>> + Send`,
//!   which an implementation may write as an `async fn`;
//! - `GreeterServer<T: Greeter>`: the [`rpc_core::Service`] a provider serves.
//!
//! ```no_run
//! // build.rs
//! fn main() -> std::io::Result<()> {
//!     rpc_build::compile_protos(&["proto/greeter.proto"], &["proto"])
//! }
//! ```
//! and in the crate: `include!(concat!(env!("OUT_DIR"), "/demo.rs"));`
//!
//! Streaming methods are not supported; a service that declares one fails to
//! compile with a message naming the method.
//!
//! [`rpc_core::Invoker`]: https://docs.rs/rpc-core
//! [`rpc_core::Service`]: https://docs.rs/rpc-core

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};

use prost_build::{Method, Service, ServiceGenerator};

/// Compiles `protos` (searching `includes` for imports) into `$OUT_DIR`.
///
/// # Errors
///
/// A parse or resolution error in a .proto file (naming file and line), or an
/// I/O error writing the output.
pub fn compile_protos(protos: &[impl AsRef<Path>], includes: &[impl AsRef<Path>]) -> io::Result<()> {
    Builder::new().compile(protos, includes)
}

/// Options for generation beyond [`compile_protos`].
#[derive(Default)]
pub struct Builder {
    out_dir: Option<PathBuf>,
    also: Option<Box<dyn ServiceGenerator>>,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("out_dir", &self.out_dir)
            .field("also", &self.also.is_some())
            .finish()
    }
}

impl Builder {
    pub fn new() -> Builder {
        Builder::default()
    }

    /// Writes the generated files here instead of `$OUT_DIR`.
    pub fn out_dir(mut self, dir: impl Into<PathBuf>) -> Builder {
        self.out_dir = Some(dir.into());
        self
    }

    /// Runs another service generator on the same services, into the same
    /// module (e.g. tonic's, to serve the messages over gRPC as well).
    pub fn also_generate(mut self, generator: Box<dyn ServiceGenerator>) -> Builder {
        self.also = Some(generator);
        self
    }

    /// Compiles `protos`, searching `includes` for imports.
    ///
    /// # Errors
    ///
    /// See [`compile_protos`].
    pub fn compile(self, protos: &[impl AsRef<Path>], includes: &[impl AsRef<Path>]) -> io::Result<()> {
        for path in protos
            .iter()
            .map(AsRef::as_ref)
            .chain(includes.iter().map(AsRef::as_ref))
        {
            println!("cargo:rerun-if-changed={}", path.display());
        }
        let fds = protox::compile(protos, includes).map_err(io::Error::other)?;
        let mut config = prost_build::Config::new();
        if let Some(dir) = self.out_dir {
            config.out_dir(dir);
        }
        config
            .bytes(["."])
            .service_generator(Box::new(StubGenerator { also: self.also }))
            .compile_fds(fds)
    }
}

/// The prost-build hook that writes client, trait and server for a service.
struct StubGenerator {
    also: Option<Box<dyn ServiceGenerator>>,
}

impl ServiceGenerator for StubGenerator {
    fn generate(&mut self, service: Service, buf: &mut String) {
        if let Some(also) = &mut self.also {
            also.generate(service.clone(), buf);
        }
        let streaming: Vec<_> = service
            .methods
            .iter()
            .filter(|m| m.client_streaming || m.server_streaming)
            .map(|m| format!("{}.{}/{}", service.package, service.proto_name, m.proto_name))
            .collect();
        if !streaming.is_empty() {
            let _ = writeln!(
                buf,
                "compile_error!(\"streaming methods are not supported: {}\");",
                streaming.join(", ")
            );
            return;
        }
        write_client(&service, buf);
        write_server(&service, buf);
    }

    fn finalize(&mut self, buf: &mut String) {
        if let Some(also) = &mut self.also {
            also.finalize(buf);
        }
    }

    fn finalize_package(&mut self, package: &str, buf: &mut String) {
        if let Some(also) = &mut self.also {
            also.finalize_package(package, buf);
        }
    }
}

fn interface_name(service: &Service) -> String {
    if service.package.is_empty() {
        service.proto_name.clone()
    } else {
        format!("{}.{}", service.package, service.proto_name)
    }
}

fn doc_comment(lines: &[String], indent: &str, buf: &mut String) {
    for line in lines {
        let _ = writeln!(buf, "{indent}///{line}");
    }
}

fn write_client(service: &Service, buf: &mut String) {
    let name = format!("{}Client", service.name);
    let interface = interface_name(service);
    let _ = write!(
        buf,
        r#"
/// Typed client for `{interface}`; calls go through the invoker `I`
/// (usually a consumer-sdk `Reference`).
#[derive(Debug, Clone)]
pub struct {name}<I> {{
    inner: I,
}}

impl<I> {name}<I> {{
    pub const INTERFACE: &'static str = "{interface}";

    pub fn new(inner: I) -> Self {{
        Self {{ inner }}
    }}

    pub fn invoker(&self) -> &I {{
        &self.inner
    }}
}}

impl<I> ::rpc_core::Stub for {name}<I> {{
    type Invoker = I;
    const INTERFACE: &'static str = "{interface}";

    fn from_invoker(invoker: I) -> Self {{
        Self::new(invoker)
    }}
}}

impl<I: ::rpc_core::Invoker> {name}<I> {{
"#
    );
    for method in &service.methods {
        write_client_method(method, buf);
    }
    buf.push_str("}\n");
}

fn write_client_method(method: &Method, buf: &mut String) {
    let Method {
        name,
        proto_name,
        input_type,
        output_type,
        ..
    } = method;
    doc_comment(&method.comments.leading, "    ", buf);
    let _ = write!(
        buf,
        r#"    pub async fn {name}(&self, request: {input_type}) -> ::core::result::Result<{output_type}, ::rpc_core::Error> {{
        ::rpc_core::codegen::unary(&self.inner, "{proto_name}", &request, &::rpc_core::CallOptions::default()).await
    }}

    /// `{name}` with a per-call timeout and attachments.
    pub async fn {name}_with(&self, request: {input_type}, options: ::rpc_core::CallOptions) -> ::core::result::Result<{output_type}, ::rpc_core::Error> {{
        ::rpc_core::codegen::unary(&self.inner, "{proto_name}", &request, &options).await
    }}

"#
    );
}

fn write_server(service: &Service, buf: &mut String) {
    let trait_name = &service.name;
    let server = format!("{}Server", service.name);
    let interface = interface_name(service);
    let _ = writeln!(
        buf,
        "\n/// Server side of `{interface}`: implement it and serve it with [`{server}`]."
    );
    doc_comment(&service.comments.leading, "", buf);
    let _ = writeln!(buf, "pub trait {trait_name}: Send + Sync + 'static {{");
    for method in &service.methods {
        doc_comment(&method.comments.leading, "    ", buf);
        let _ = writeln!(
            buf,
            "    fn {}(&self, request: ::rpc_core::Request<{}>) -> impl ::core::future::Future<Output = ::core::result::Result<{}, ::rpc_core::Status>> + Send;",
            method.name, method.input_type, method.output_type
        );
    }
    buf.push_str("}\n");

    let names: Vec<String> = service.methods.iter().map(|m| format!("{:?}", m.proto_name)).collect();
    let _ = write!(
        buf,
        r#"
/// Serves an implementation of [`{trait_name}`] (add it to a provider).
pub struct {server}<T> {{
    inner: ::std::sync::Arc<T>,
}}

impl<T> {server}<T> {{
    pub fn new(inner: T) -> Self {{
        Self {{ inner: ::std::sync::Arc::new(inner) }}
    }}

    pub fn from_arc(inner: ::std::sync::Arc<T>) -> Self {{
        Self {{ inner }}
    }}
}}

impl<T> ::core::fmt::Debug for {server}<T> {{
    fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {{
        f.write_str("{server}")
    }}
}}

impl<T> ::core::clone::Clone for {server}<T> {{
    fn clone(&self) -> Self {{
        Self {{ inner: self.inner.clone() }}
    }}
}}

impl<T: {trait_name}> ::rpc_core::Service for {server}<T> {{
    fn interface(&self) -> &'static str {{
        "{interface}"
    }}

    fn methods(&self) -> &'static [&'static str] {{
        &[{names}]
    }}

    fn call(
        &self,
        method: &str,
        request: ::rpc_core::Request<::rpc_core::codegen::Bytes>,
    ) -> ::rpc_core::codegen::BoxFuture<::rpc_core::codegen::Bytes> {{
        match method {{
"#,
        names = names.join(", ")
    );
    for method in &service.methods {
        let _ = write!(
            buf,
            r#"            "{proto_name}" => {{
                let inner = self.inner.clone();
                ::std::boxed::Box::pin(async move {{
                    let request = ::rpc_core::codegen::decode_request::<{input_type}>(request)?;
                    let reply = inner.{name}(request).await?;
                    Ok(::rpc_core::codegen::encode_reply(&reply))
                }})
            }}
"#,
            proto_name = method.proto_name,
            input_type = method.input_type,
            name = method.name,
        );
    }
    let _ = write!(
        buf,
        r#"            _ => ::rpc_core::codegen::method_not_found("{interface}", method),
        }}
    }}
}}
"#
    );
}
