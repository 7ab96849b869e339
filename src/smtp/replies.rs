//! Every reply a client can see, with its enhanced status code, in one place.
