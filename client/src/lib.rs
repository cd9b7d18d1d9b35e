//! nnmesh client (in progress)
