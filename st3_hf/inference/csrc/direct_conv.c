/* Direct sparse convolution, NCHW float32: every stored weight adds its scaled, shifted input plane into
 * its output plane.  No patch matrix, no per-tap product: the work is (stored weights) x (output pixels).
 * One (image, output channel) plane per task; the plane being written stays in the core's cache. */
#include <stdint.h>

static int first_valid(int offset, int stride) {  /* smallest o >= 0 with o * stride + offset >= 0 */
    return offset >= 0 ? 0 : (-offset + stride - 1) / stride;
}

static int end_valid(int offset, int stride, int size, int out_size) {  /* o * stride + offset < size */
    int last = size - 1 - offset;
    int end = last < 0 ? 0 : last / stride + 1;
    return end < out_size ? end : out_size;
}

void st3_direct_conv2d_f32(const float *x, float *out, int batch, int in_ch, int height, int width,
                           int out_ch, int out_h, int out_w, int stride_h, int stride_w,
                           const int64_t *row_start, const int32_t *channel, const int32_t *dy,
                           const int32_t *dx, const float *value, const float *bias, int threads) {
    const int64_t in_plane = (int64_t)height * width, out_plane = (int64_t)out_h * out_w;
#pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(threads)
    for (int b = 0; b < batch; ++b) {
        for (int o = 0; o < out_ch; ++o) {
            float *y = out + ((int64_t)b * out_ch + o) * out_plane;
            const float start = bias ? bias[o] : 0.0f;
            for (int64_t p = 0; p < out_plane; ++p) y[p] = start;
            for (int64_t k = row_start[o]; k < row_start[o + 1]; ++k) {
                const float *plane = x + ((int64_t)b * in_ch + channel[k]) * in_plane;
                const float v = value[k];
                const int oy = dy[k], ox = dx[k];
                const int h0 = first_valid(oy, stride_h), h1 = end_valid(oy, stride_h, height, out_h);
                const int w0 = first_valid(ox, stride_w), w1 = end_valid(ox, stride_w, width, out_w);
                for (int oh = h0; oh < h1; ++oh) {
                    const float *src = plane + (int64_t)(oh * stride_h + oy) * width + ox;
                    float *dst = y + (int64_t)oh * out_w;
                    if (stride_w == 1) {
                        for (int ow = w0; ow < w1; ++ow) dst[ow] += v * src[ow];
                    } else {
                        for (int ow = w0; ow < w1; ++ow) dst[ow] += v * src[ow * stride_w];
                    }
                }
            }
        }
    }
}
