//! Generates the Rust types and tonic services for etcd's API, Tessera's
//! internal messages and the CSI spec's services. protoc comes from the
//! vendored crate, so no system protoc is needed.
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
        "tessera/peer.proto",
        "tessera/store.proto",
        "csi/csi.proto",
    ];
    // google/protobuf/*.proto, which the CSI spec imports.
    let google = protoc_bin_vendored::include_path()?;
    let google = google
        .to_str()
        .ok_or("protoc's include path is not UTF-8")?;
    let includes = ["etcd", "tessera", "csi", google];
    let descriptors = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("descriptors.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptors)
        .build_server(true)
        .build_client(true)
        // RPCs Tessera does not serve yet answer Unimplemented instead of failing to compile.
        .generate_default_stubs(true)
        .compile_protos(&protos, &includes)?;
    // JSON (de)serialization with protobuf's JSON mapping, for the HTTP
    // gateway: etcd's gateway uses the original field names, int64 as
    // strings, bytes as base64 and enums by name.
    pbjson_build::Builder::new()
        .register_descriptors(&std::fs::read(&descriptors)?)?
        .preserve_proto_field_names()
        .build(&[
            ".etcdserverpb",
            ".mvccpb",
            ".authpb",
            ".v3lockpb",
            ".v3electionpb",
        ])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
