"""Human-readable sizes and durations for tables and READMEs."""


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def fmt_s(x) -> str:
    if x is None:
        return "-"
    if x >= 1:
        return f"{x:.3f} s"
    if x >= 1e-3:
        return f"{1e3 * x:.3f} ms"
    return f"{1e6 * x:.1f} us"


def fmt_x(x) -> str:
    return "-" if x is None else f"{x:.2f}x"
