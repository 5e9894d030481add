"""Reports for kernel developers: the ahead-of-time kernel report and the roofline model."""
