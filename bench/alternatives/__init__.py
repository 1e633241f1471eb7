"""Alternative implementations that ``make bench`` measures against production code;
none of it is installed or run by a relay (the benchmarks are ``bench/bench_*.py``)."""
