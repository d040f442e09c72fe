//! Transport building blocks (being written).
