// The pod sandbox ("pause") binary of the real node, packaged as a one-layer image by diffusion-dev.
module github.com/diffusion-operator/tools/pause

go 1.26.0
