"""valve-id backend: the service Label Studio talks to, and the command line."""
