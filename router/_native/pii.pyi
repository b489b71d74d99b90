KINDS: tuple[str, ...]
ALL_KINDS: int

def scan(text: str, mask: int = ...) -> list[tuple[int, int, int, float]]: ...
