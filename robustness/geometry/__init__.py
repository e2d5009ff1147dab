"""Pure, batched tensor geometry: input Hessians, boundary planes, paths between images, colour."""
