//! Generates the Rust types and tonic services for etcd's API and Tessera's
//! internal messages. protoc comes from the vendored crate, so no system
//! protoc is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let protos = [
        "etcd/mvccpb/kv.proto",
        "etcd/authpb/auth.proto",
        "etcd/etcdserverpb/rpc.proto",
        "etcd/v3lockpb/v3lock.proto",
        "etcd/v3electionpb/v3election.proto",
        "tessera/raft.proto",
    ];
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // RPCs Tessera does not serve yet answer Unimplemented instead of failing to compile.
        .generate_default_stubs(true)
        .compile_protos(&protos, &["etcd", "tessera"])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
