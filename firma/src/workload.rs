//! `firma sidecar attach|detach|status`: talks to a running sidecar over its control socket
//! (owned by the transparent-interception work; placeholder until it lands).
