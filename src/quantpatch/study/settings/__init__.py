"""What a study asks for: its validated settings and the rules that name its models."""
