//! The EVS volume server: NBD front end, control API and the daemon that wires them to the
//! block store. The binary (`main.rs`) is a thin clap shell over [`daemon`].

pub mod api;
pub mod config;
pub mod daemon;
pub mod exports;
mod in_flight;
pub mod jobs;
pub mod metrics;
pub mod nbd;
pub mod policy;
pub mod qos;
pub mod tls;
pub mod vhost;
pub mod volume_io;
pub mod write_back;
