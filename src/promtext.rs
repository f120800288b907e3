//! Prometheus text-format parsing that materialises only the families a caller asks for.
